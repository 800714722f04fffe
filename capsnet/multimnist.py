"""MultiMNIST (Sabour, Frosst & Hinton 2017, section 6) in pure NumPy: pairs, metric and figure.

Each 28x28 digit is padded by 4 pixels on every side and shifted by a whole number of pixels, up to
4 in each direction (x and y independently, uniform in -4..4), giving a 36x36 image; it is overlaid
with a digit of a *different class* from the same split, shifted the same way, and every pixel is
`min(a + b, 1)` (the paper's `min(a + b, 255)` for uint8 pixels). The labels are two-hot. The
decoder reconstructs each digit on its own, against that digit's own shifted 36x36 image, so the
two shifted single digits come with every pair.

No TensorFlow or Keras is imported here, so it works on any Keras backend (JAX without TensorFlow).

Usage::

    from capsnet import datasets, multimnist

    (x_train, y_train), (x_test, y_test) = datasets.load_dataset("mnist")   # [n, 28, 28, 1], one-hot
    test = multimnist.test_pairs(x_test, y_test)                         # fixed: 20,000 images
    for epoch in range(epochs):
        train = multimnist.train_pairs(x_train, y_train, seed, epoch)    # 60,000 fresh pairs
        # inputs train.x [n, 36, 36, 1] and train.y [n, 10] (two-hot); the decoder's targets
        # train.first and train.second [n, 36, 36, 1], masked by the classes train.labels [n, 2]
    scores = multimnist.accuracy(lengths, test.y)       # lengths: [n, 10] capsule lengths
    error = 1 - scores["both"]
    image = multimnist.overlay_image(test.x, recon_first, recon_second)  # real_and_recon.png
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# The paper: "shifted by up to 4 pixels in each direction resulting in a 36x36 image". Padding by
# as much as the largest shift keeps the whole 28x28 frame of a digit inside the canvas at any
# shift, so no pixel is ever cut off or wrapped around.
PAD = 4
MAX_SHIFT = 4
# Number of distinct shifts per axis: -4..4.
N_SHIFTS = 2 * MAX_SHIFT + 1

# Partners per test digit. The paper generated 1,000 per digit (10M images for MNIST's 10,000 test
# digits), too many to evaluate after every epoch; 2 gives 20,000 images, in which every test digit
# appears twice as the first digit (and on average twice more as a partner), with 9 * 9 * 9 * 9
# possible shift combinations per pair. Any K draws from the same distribution as the paper's K =
# 1,000, so the error is an estimate of the same quantity; its standard error at ~5% error and
# 20,000 images is ~0.15 percentage points (the images share digits, so slightly more).
DEFAULT_TEST_PAIRS = 2

# The fixed seed of the test set: it never depends on the user's --seed, so every run, every resumed
# run and every seed is scored on the same images. (The date of the paper on arXiv.)
TEST_SEED = 20171026

# Tags mixed into the seeds of NumPy's generators. `[seed, epoch]` alone is already the batch-order
# stream of `capsulenet.train_dataset`; the tags keep the pairings independent of it and of each
# other. ("MMtr" and "MMte" in ASCII.)
TRAIN_STREAM = 0x4D4D7472
TEST_STREAM = 0x4D4D7465



@dataclass(frozen=True)
class Pairs:
    """A batch of MultiMNIST images and everything needed to train on them and score them.

    Attributes:
        x: `[n, 36, 36, 1]` float32, the overlaid images `min(first + second, 1)`.
        y: `[n, n_class]` float32, two-hot: 1 at both digits' classes.
        first: `[n, 36, 36, 1]` float32, the first digit alone, padded and shifted.
        second: `[n, 36, 36, 1]` float32, the second digit alone, padded and shifted.
        labels: `[n, 2]` int64, the classes of the first and the second digit (always different).
        index: `[n, 2]` int64, the indices of the first and the second digit in the source `x`.
        shifts: `[n, 2, 2]` int64, `shifts[k, d] = (dx, dy)` of digit d (0 first, 1 second) of image
            k, each in -MAX_SHIFT..MAX_SHIFT; dx > 0 moves right, dy > 0 moves down.
    """

    x: np.ndarray
    y: np.ndarray
    first: np.ndarray
    second: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    shifts: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def take(self, idx: np.ndarray | slice | int) -> Pairs:
        """The pairs at `idx` (indices, a boolean mask or a slice) as a new `Pairs`.

        An integer keeps its axis, so `pairs.take(3)` is a batch of 1 (`x` `[1, 36, 36, 1]`).
        """
        if isinstance(idx, (int, np.integer)):
            idx = slice(int(idx), int(idx) + 1 if idx != -1 else None)
        return Pairs(x=self.x[idx], y=self.y[idx], first=self.first[idx], second=self.second[idx],
                     labels=self.labels[idx], index=self.index[idx], shifts=self.shifts[idx])


# ---------------------------------------------------------------------------------------------
# Shifting
# ---------------------------------------------------------------------------------------------


def _check_shifts(values: np.ndarray, n: int, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim == 0:
        values = np.full(n, values)
    if values.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {values.shape}")
    if not np.issubdtype(values.dtype, np.integer):
        if not np.issubdtype(values.dtype, np.number) or (values != np.round(values)).any():
            raise ValueError(f"{name} must be whole numbers of pixels")
    values = values.astype(np.int64)
    if values.size and (np.abs(values) > MAX_SHIFT).any():
        raise ValueError(f"{name} must lie in -{MAX_SHIFT}..{MAX_SHIFT}, got {values.min()}..{values.max()}")
    return values


def _place(source: np.ndarray, index: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """`source[index[i]]` padded by PAD and moved by `(dx[i], dy[i])`, for every i at once.

    The images are grouped by their shift (at most 9 * 9 = 81 groups) and each group is copied with
    one slice assignment, so the cost is a couple of copies of the data, not a Python loop per image
    nor an index array per pixel (which for 60k images would take ~600 MB). Gathering straight
    from `source` by `index` avoids a temporary copy of the partners.

    Args:
        source: `[m, rows, cols, ch]`.
        index: `[n]` indices into `source`.
        dx, dy: `[n]` integer shifts in -MAX_SHIFT..MAX_SHIFT, already checked.

    Returns:
        `[n, rows + 2 * PAD, cols + 2 * PAD, ch]`, zero where no source pixel lands.
    """
    n = len(index)
    rows, cols = source.shape[1:3]
    out = np.zeros((n, rows + 2 * PAD, cols + 2 * PAD) + source.shape[3:], dtype=source.dtype)
    code = (dy + MAX_SHIFT) * N_SHIFTS + (dx + MAX_SHIFT)
    order = np.argsort(code, kind="stable")
    bounds = np.flatnonzero(np.diff(code[order])) + 1
    for group in np.split(order, bounds):
        if not len(group):
            continue
        top = PAD + int(dy[group[0]])
        left = PAD + int(dx[group[0]])
        out[group, top : top + rows, left : left + cols] = source[index[group]]
    return out


def shift_pad(images: np.ndarray, dx: np.ndarray | int, dy: np.ndarray | int) -> np.ndarray:
    """Pads every image by PAD on each side and moves it by its own whole number of pixels.

    Pixel `(r, c)` of image i lands at `(r + PAD + dy[i], c + PAD + dx[i])`; the rest is zero and
    nothing wraps around (with PAD = MAX_SHIFT nothing falls off either).

    Args:
        images: `[n, rows, cols, ch]`, e.g. `[n, 28, 28, 1]`.
        dx: `[n]` integers (or one for all) in -MAX_SHIFT..MAX_SHIFT, > 0 moves right.
        dy: `[n]` integers (or one for all) in -MAX_SHIFT..MAX_SHIFT, > 0 moves down.

    Returns:
        `[n, rows + 8, cols + 8, ch]` of the same dtype, e.g. `[n, 36, 36, 1]`.

    Raises:
        ValueError: the images are not 4-D, or a shift is not whole or is out of range.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [n, rows, cols, channels], got shape {images.shape}")
    n = len(images)
    dx = _check_shifts(dx, n, "dx")
    dy = _check_shifts(dy, n, "dy")
    return _place(images, np.arange(n), dx, dy)


def overlay(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The paper's overlay `min(first + second, 1)` of two `[n, 36, 36, 1]` float images in [0, 1]."""
    out = np.add(first, second)
    return np.minimum(out, 1.0, out=out)


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------


def _class_labels(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if x.ndim != 4:
        raise ValueError(f"x must be [n, rows, cols, channels], got shape {x.shape}")
    if y.ndim != 2 or len(y) != len(x):
        raise ValueError(f"y must be one-hot [n, n_class] with n = {len(x)}, got shape {y.shape}")
    return x, np.argmax(y, axis=1).astype(np.int64), int(y.shape[1])


def _draw_partners(labels: np.ndarray, n_class: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """For every digit, k distinct partners drawn uniformly from the digits of the other classes.

    All n rows are drawn at once: a partner is a rank r among the m = n - count(own class) other
    digits, mapped onto the digits sorted by class by skipping over the digit's own class. The k
    distinct ranks of a row come from Floyd's algorithm (a uniform k-subset in k vectorised steps),
    then the row is shuffled so that the order is uniform too.

    Args:
        labels: `[n]` classes.
        n_class: number of classes.
        k: partners per digit.
        rng: the generator; the result depends only on its state.

    Returns:
        `[n, k]` indices into `labels`, each of a class other than the row's own.

    Raises:
        ValueError: some class has fewer than k digits of other classes (e.g. a single class).
    """
    n = len(labels)
    counts = np.bincount(labels, minlength=n_class)
    others = n - counts[labels]  # [n] digits of other classes
    if n and others.min() < k:
        raise ValueError(f"need at least {k} digits of other classes for every digit; class "
                         f"{int(labels[np.argmin(others)])} has only {int(others.min())} "
                         "(MultiMNIST needs at least 2 classes)")
    ranks = np.empty((n, k), dtype=np.int64)
    for step in range(k):
        # Floyd: j runs over m - k .. m - 1; take t in 0..j, or j itself if t was already taken.
        j = others - k + step
        t = rng.integers(0, j + 1)
        taken = (ranks[:, :step] == t[:, None]).any(axis=1)
        ranks[:, step] = np.where(taken, j, t)
    if k > 1:
        ranks = rng.permuted(ranks, axis=1)
    # Ranks below the start of the own class map directly, the others skip its `count` digits.
    by_class = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    own_start = starts[labels][:, None]
    positions = ranks + np.where(ranks >= own_start, counts[labels][:, None], 0)
    return by_class[positions]


def _make_pairs(
    x: np.ndarray, labels: np.ndarray, n_class: int, index: np.ndarray, shifts: np.ndarray
) -> Pairs:
    """Builds the images of the pairs `index` `[n, 2]` with `shifts` `[n, 2, 2]` from `x`."""
    first = _place(x, index[:, 0], shifts[:, 0, 0], shifts[:, 0, 1])
    second = _place(x, index[:, 1], shifts[:, 1, 0], shifts[:, 1, 1])
    pair_labels = labels[index]
    rows = np.arange(len(index))
    y = np.zeros((len(index), n_class), dtype=np.float32)
    y[rows, pair_labels[:, 0]] = 1.0
    y[rows, pair_labels[:, 1]] = 1.0
    return Pairs(x=overlay(first, second), y=y, first=first, second=second, labels=pair_labels,
                 index=index, shifts=shifts)


def _random_shifts(n: int, rng: np.random.Generator) -> np.ndarray:
    """`[n, 2, 2]` independent uniform shifts in -MAX_SHIFT..MAX_SHIFT: (dx, dy) for both digits."""
    return rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(n, 2, 2), dtype=np.int64)


def train_pairs(x: np.ndarray, y: np.ndarray, seed: int, epoch: int) -> Pairs:
    """One epoch of training pairs: every digit, in its original order, with a fresh partner.

    Image i has digit i first and a partner of another class, drawn uniformly from all such digits
    of `x`, second; both get fresh shifts. Everything depends only on `(seed, epoch)` (through
    `np.random.default_rng([seed, epoch, TRAIN_STREAM])`), so a resumed run and `--seed` reproduce it
    exactly with the same NumPy.

    Args:
        x: `[n, rows, cols, ch]` float in [0, 1], e.g. `[60000, 28, 28, 1]`.
        y: `[n, n_class]` one-hot.
        seed, epoch: non-negative integers.

    Returns:
        `Pairs` of n images `[n, rows + 8, cols + 8, ch]`. For 60,000 MNIST digits `x`, `first` and
        `second` take 311 MB each (~0.93 GB together).

    Raises:
        ValueError: bad shapes, a negative seed or epoch, or fewer than 2 classes.
    """
    if int(seed) < 0 or int(epoch) < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    x, labels, n_class = _class_labels(x, y)
    rng = np.random.default_rng([int(seed), int(epoch), TRAIN_STREAM])
    partners = _draw_partners(labels, n_class, 1, rng)[:, 0]
    index = np.stack([np.arange(len(x)), partners], axis=1)
    return _make_pairs(x, labels, n_class, index, _random_shifts(len(x), rng))


def test_pairs(x: np.ndarray, y: np.ndarray, pairs_per_digit: int = DEFAULT_TEST_PAIRS) -> Pairs:
    """The fixed test set: every test digit with `pairs_per_digit` (K) distinct partners.

    Image `i * K + j` has test digit i first and its j-th partner, of another class, second; the
    partners and all shifts come from the fixed TEST_SEED, never from the user's seed, so every run
    is scored on the same n * K images. The paper made K = 1,000 (10M images for MNIST); the default
    K = DEFAULT_TEST_PAIRS = 2 gives 20,000 images from the same distribution (see there).

    Args:
        x: `[n, rows, cols, ch]` float in [0, 1], e.g. `[10000, 28, 28, 1]`.
        y: `[n, n_class]` one-hot.
        pairs_per_digit: K >= 1.

    Returns:
        `Pairs` of n * K images `[n * K, rows + 8, cols + 8, ch]`, digit-major.

    Raises:
        ValueError: bad shapes, K < 1, or a class with fewer than K digits of other classes.
    """
    k = int(pairs_per_digit)
    if k < 1:
        raise ValueError(f"pairs_per_digit must be >= 1, got {pairs_per_digit}")
    x, labels, n_class = _class_labels(x, y)
    rng = np.random.default_rng([TEST_SEED, TEST_STREAM, k])
    partners = _draw_partners(labels, n_class, k, rng)
    index = np.stack([np.repeat(np.arange(len(x)), k), partners.reshape(-1)], axis=1)
    return _make_pairs(x, labels, n_class, index, _random_shifts(len(index), rng))


# pytest would otherwise collect `test_pairs` as a test when a test module imports it by name.
test_pairs.__test__ = False  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# Metric
# ---------------------------------------------------------------------------------------------


def two_longest(lengths: np.ndarray) -> np.ndarray:
    """The classes of the two longest capsules, longest first (ties: the lower class first).

    Args:
        lengths: `[n, n_class]` capsule lengths (or any scores).

    Returns:
        `[n, 2]` int64 class indices.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 2 or lengths.shape[1] < 2:
        raise ValueError(f"lengths must be [n, n_class] with n_class >= 2, got shape {lengths.shape}")
    return np.argsort(-lengths, axis=1, kind="stable")[:, :2].astype(np.int64)


def accuracy(lengths: np.ndarray, y_two_hot: np.ndarray) -> dict[str, float]:
    """The official code's MultiMNIST scores.

    Args:
        lengths: `[n, n_class]` capsule lengths.
        y_two_hot: `[n, n_class]` with exactly two ones per row (`Pairs.y`).

    Returns:
        `{"both": ..., "at_least_one": ..., "error": ...}`: the share of images whose two longest
        capsules are exactly their two classes (in either order), the share where at least one of
        the two longest is one of their classes, and the paper's error `1 - both`.

    Raises:
        ValueError: shapes differ or a row of `y_two_hot` is not two-hot.
    """
    y = np.asarray(y_two_hot)
    lengths = np.asarray(lengths)
    if y.shape != lengths.shape:
        raise ValueError(f"lengths {lengths.shape} and y_two_hot {y.shape} must have the same shape")
    if not (np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 2).all()):
        raise ValueError("y_two_hot must have exactly two ones per row (and zeros elsewhere)")
    if len(y) == 0:
        return {"both": float("nan"), "at_least_one": float("nan"), "error": float("nan")}
    hits = np.take_along_axis(y, two_longest(lengths), axis=1).sum(axis=1)  # [n]: 0, 1 or 2
    both = float(np.mean(hits == 2))
    return {"both": both, "at_least_one": float(np.mean(hits >= 1)), "error": 1.0 - both}


# ---------------------------------------------------------------------------------------------
# Training batches
# ---------------------------------------------------------------------------------------------


def batch_arrays(pairs: Pairs) -> tuple[np.ndarray, ...]:
    """A batch as `losses.TWO_DIGITS` takes it: `(x, y two-hot, y of first one-hot, y of second
    one-hot, first, second)`."""
    eye = np.eye(pairs.y.shape[1], dtype=np.float32)
    return (pairs.x, pairs.y, eye[pairs.labels[:, 0]], eye[pairs.labels[:, 1]], pairs.first, pairs.second)


class PairBatcher:
    """MultiMNIST batches for `training.Trainer`: every epoch, fresh pairs of the training digits
    (`train_pairs`), shuffled in the order of `training.batch_order`; validation on the fixed
    `test_pairs` of the test digits.

    Args:
        batch_size: images per training step.
        test_pairs: partners per test digit (K of `test_pairs`).
    """

    def __init__(self, batch_size: int, test_pairs: int = DEFAULT_TEST_PAIRS) -> None:
        self.batch_size = batch_size
        self.test_pairs = test_pairs
        self._valid: tuple[int, tuple[np.ndarray, ...]] | None = None

    def train(self, x: np.ndarray, y: np.ndarray, epoch: int, seed: int) -> Iterator[tuple[np.ndarray, ...]]:
        from capsnet.batches import batch_order  # the same shuffling as single digits

        pairs = train_pairs(x, y, seed, epoch)
        for indices in batch_order(len(pairs), self.batch_size, seed, epoch):
            yield batch_arrays(pairs.take(indices))

    def valid(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
        """`batch_arrays` of the test pairs of `(x, y)`, made once per test set (they are fixed)."""
        if self._valid is None or self._valid[0] != id(x):
            self._valid = (id(x), batch_arrays(test_pairs(x, y, self.test_pairs)))
        return self._valid[1]
