"""MultiMNIST (`multimnist.py`) on hand-made digits whose expected pairs can be worked out by hand.

Most digits here are a single bright pixel whose *value* names the digit: digit i is `(i + 1) / 128`
at one known place. In a generated image the pixel's position then gives the shift and its value
the source digit, independently of the bookkeeping (`index`, `shifts`) that the module returns, and
sums of two such values are exact in float32 (and below 1 for up to 64 digits).
"""

from __future__ import annotations

import numpy as np
import pytest

from capsnet import multimnist as mm
from capsnet import plots
from capsnet.multimnist import MAX_SHIFT, PAD

SIDE = 28
OUT = SIDE + 2 * PAD  # 36
VALUE_SCALE = 128  # digit i has value (i + 1) / 128: exact in float32; for n <= 64 two sum below 1
ALL_SHIFTS = set(range(-MAX_SHIFT, MAX_SHIFT + 1))


def one_hot(labels: np.ndarray, n_class: int = 10) -> np.ndarray:
    return np.eye(n_class, dtype=np.float32)[np.asarray(labels)]


def pixel_digits(n: int, row: int = 14, col: int = 14) -> np.ndarray:
    """`[n, 28, 28, 1]`: digit i is a single pixel of value (i + 1) / 128 at (row, col)."""
    assert n < VALUE_SCALE - 1
    x = np.zeros((n, SIDE, SIDE, 1), dtype=np.float32)
    x[:, row, col, 0] = (np.arange(n) + 1) / VALUE_SCALE
    return x


def locate(image: np.ndarray) -> tuple[int, int, int]:
    """(row, col, source digit) of the only non-zero pixel of a `[36, 36, 1]` image."""
    rows, cols, _ = np.nonzero(image)
    assert len(rows) == 1, f"expected exactly one bright pixel, found {len(rows)}"
    value = float(image[rows[0], cols[0], 0])
    source = round(value * VALUE_SCALE) - 1
    assert value == pytest.approx((source + 1) / VALUE_SCALE, abs=1e-7)
    return int(rows[0]), int(cols[0]), source


def decode(pairs: mm.Pairs, row: int = 14, col: int = 14) -> tuple[np.ndarray, np.ndarray]:
    """From the images alone: source digits `[n, 2]` and shifts `[n, 2, 2]` ((dx, dy) per digit)."""
    sources = np.zeros((len(pairs), 2), dtype=np.int64)
    shifts = np.zeros((len(pairs), 2, 2), dtype=np.int64)
    for k in range(len(pairs)):
        for d, images in enumerate((pairs.first, pairs.second)):
            r, c, source = locate(images[k])
            sources[k, d] = source
            shifts[k, d] = (c - (col + PAD), r - (row + PAD))
    return sources, shifts


# ---------------------------------------------------------------------------------------------
# Shifting and overlay
# ---------------------------------------------------------------------------------------------


def test_shift_pad_moves_each_pixel_by_its_own_shift() -> None:
    # (row, col, dx, dy): the corners at the extreme shifts land on the canvas' own corners.
    cases = [(14, 14, 0, 0), (14, 14, 3, -2), (0, 0, -4, -4), (27, 27, 4, 4), (0, 27, 4, -4),
             (27, 0, -4, 4), (5, 20, -1, 4), (20, 5, 2, 1)]
    images = np.zeros((len(cases), SIDE, SIDE, 1), dtype=np.float32)
    for i, (r, c, _, _) in enumerate(cases):
        images[i, r, c, 0] = 1.0
    dx = np.array([case[2] for case in cases])
    dy = np.array([case[3] for case in cases])
    out = mm.shift_pad(images, dx, dy)
    assert out.shape == (len(cases), OUT, OUT, 1)
    assert out.dtype == np.float32
    for i, (r, c, x_shift, y_shift) in enumerate(cases):
        expected = np.zeros((OUT, OUT, 1), dtype=np.float32)
        expected[r + PAD + y_shift, c + PAD + x_shift, 0] = 1.0
        np.testing.assert_array_equal(out[i], expected, err_msg=f"case {cases[i]}")
    assert out[2, 0, 0, 0] == 1.0 and out[3, OUT - 1, OUT - 1, 0] == 1.0


def test_shift_pad_zero_fill_no_wrap_any_size_and_channels() -> None:
    # Full images: the shifted frame is exactly a 28x28 block of ones, the rest zeros, nothing wraps.
    shifts = [(-4, -4), (4, 4), (-4, 3), (0, 0), (2, -1)]
    images = np.ones((len(shifts), SIDE, SIDE, 1), dtype=np.float32)
    out = mm.shift_pad(images, [s[0] for s in shifts], [s[1] for s in shifts])
    for i, (dx, dy) in enumerate(shifts):
        expected = np.zeros((OUT, OUT, 1), dtype=np.float32)
        expected[PAD + dy : PAD + dy + SIDE, PAD + dx : PAD + dx + SIDE] = 1.0
        np.testing.assert_array_equal(out[i], expected)
        assert out[i].sum() == SIDE * SIDE
    # Any size and any number of channels: [n, rows, cols, ch] -> [n, rows + 8, cols + 8, ch].
    small = np.arange(2 * 5 * 7 * 2, dtype=np.float32).reshape(2, 5, 7, 2)
    moved = mm.shift_pad(small, [1, -3], -2)
    assert moved.shape == (2, 13, 15, 2)
    np.testing.assert_array_equal(moved[0, 2:7, 5:12], small[0])
    np.testing.assert_array_equal(moved[1, 2:7, 1:8], small[1])
    assert moved.sum() == small.sum()


@pytest.mark.parametrize("dx, dy", [(5, 0), (0, -5), (1.5, 0)])
def test_shift_pad_rejects_bad_shifts(dx: float, dy: float) -> None:
    with pytest.raises(ValueError):
        mm.shift_pad(np.zeros((1, SIDE, SIDE, 1), dtype=np.float32), [dx], [dy])


def test_overlay_is_sum_capped_at_one() -> None:
    a = np.array([0.7, 0.2, 0.0, 1.0, 0.5], dtype=np.float32)
    b = np.array([0.6, 0.3, 0.4, 1.0, 0.0], dtype=np.float32)
    np.testing.assert_allclose(mm.overlay(a, b), [1.0, 0.5, 0.4, 1.0, 0.5], rtol=0, atol=1e-7)


@pytest.mark.parametrize("values, overlap", [((0.7, 0.6), 1.0), ((0.2, 0.3), 0.5)])
def test_pairs_overlay_known_squares(values: tuple[float, float], overlap: float) -> None:
    # Two 20x20 squares of classes 0 and 1: each is the other's only possible partner, and however
    # they are shifted (at most 8 apart) they overlap in (20 - |dx1 - dx2|) x (20 - |dy1 - dy2|).
    x = np.zeros((2, SIDE, SIDE, 1), dtype=np.float32)
    x[0, 4:24, 4:24] = values[0]
    x[1, 4:24, 4:24] = values[1]
    for epoch in range(5):
        pairs = mm.train_pairs(x, one_hot([0, 1]), seed=3, epoch=epoch)
        np.testing.assert_array_equal(pairs.index, [[0, 1], [1, 0]])
        for k in range(2):
            (dx1, dy1), (dx2, dy2) = pairs.shifts[k]
            area = (20 - abs(dx1 - dx2)) * (20 - abs(dy1 - dy2))
            both = (pairs.first[k] > 0) & (pairs.second[k] > 0)
            assert both.sum() == area
            np.testing.assert_allclose(pairs.x[k][both], overlap, rtol=0, atol=1e-6)
            only_first = (pairs.first[k] > 0) & ~both
            only_second = (pairs.second[k] > 0) & ~both
            np.testing.assert_allclose(pairs.x[k][only_first], values[k], rtol=0, atol=1e-7)
            np.testing.assert_allclose(pairs.x[k][only_second], values[1 - k], rtol=0, atol=1e-7)
            assert (pairs.x[k][(pairs.first[k] == 0) & (pairs.second[k] == 0)] == 0).all()
            assert only_first.sum() == only_second.sum() == 400 - area


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------


def test_train_pairs_content_labels_and_bookkeeping() -> None:
    n = 60
    labels = np.arange(n) % 10
    x = pixel_digits(n)
    pairs = mm.train_pairs(x, one_hot(labels), seed=0, epoch=0)
    assert len(pairs) == n
    for array in (pairs.x, pairs.first, pairs.second):
        assert array.shape == (n, OUT, OUT, 1) and array.dtype == np.float32
    sources, shifts = decode(pairs)
    # Every digit in its original order, each moved exactly by its own shift within +-4.
    np.testing.assert_array_equal(sources[:, 0], np.arange(n))
    assert np.abs(shifts).max() <= MAX_SHIFT
    np.testing.assert_array_equal(sources, pairs.index)
    np.testing.assert_array_equal(shifts, pairs.shifts)
    # Partner of another class; labels and two-hot y match the digits found in the images.
    np.testing.assert_array_equal(pairs.labels, labels[sources])
    assert (pairs.labels[:, 0] != pairs.labels[:, 1]).all()
    assert pairs.y.shape == (n, 10) and pairs.y.dtype == np.float32
    assert set(np.unique(pairs.y)) == {0.0, 1.0}
    np.testing.assert_array_equal(pairs.y.sum(axis=1), 2)
    rows = np.arange(n)
    assert (pairs.y[rows, pairs.labels[:, 0]] == 1).all() and (pairs.y[rows, pairs.labels[:, 1]] == 1).all()
    # The overlay of two single pixels: their sum where they meet (values stay below 1 here).
    np.testing.assert_array_equal(pairs.x, pairs.first + pairs.second)
    # take() keeps every field aligned.
    part = pairs.take(np.array([5, 2]))
    np.testing.assert_array_equal(part.first, pairs.first[[5, 2]])
    np.testing.assert_array_equal(part.labels, pairs.labels[[5, 2]])
    assert len(pairs.take(slice(10, 20))) == 10 and pairs.take(3).x.shape == (1, OUT, OUT, 1)


def test_partner_always_another_class_with_unbalanced_classes() -> None:
    # One class holds most digits and one holds a single digit: the partner is still never of the
    # digit's own class, and the partners spread over the other digits.
    labels = np.array([0] * 150 + [1] * 40 + [2] * 9 + [3])
    rng = np.random.default_rng(1)
    x = rng.random((len(labels), SIDE, SIDE, 1), dtype=np.float32)
    partner_counts = np.zeros(len(labels), dtype=np.int64)
    for epoch in range(20):
        pairs = mm.train_pairs(x, one_hot(labels, 4), seed=11, epoch=epoch)
        assert (labels[pairs.index[:, 1]] != labels).all()
        np.testing.assert_array_equal(pairs.labels, labels[pairs.index])
        np.add.at(partner_counts, pairs.index[:, 1], 1)
    # The 150 class-0 digits are partners of the 50 others (~930 of their 1000 draws, ~6 each): most
    # get picked. The lone class-3 digit is 1 of 50 candidates for each class-0 digit (3000 draws),
    # 1 of 160 for class 1 (800) and 1 of 191 for class 2 (180): expected ~66, standard deviation ~8.
    assert (partner_counts[:150] > 0).mean() > 0.9
    assert 35 < partner_counts[-1] < 100


def test_train_pairs_reproducible_from_seed_and_epoch_only() -> None:
    n = 50
    x = pixel_digits(n)
    y = one_hot(np.arange(n) % 10)
    np.random.seed(1)
    a = mm.train_pairs(x, y, seed=7, epoch=2)
    np.random.seed(2)  # NumPy's global state must not matter
    b = mm.train_pairs(x, y, seed=7, epoch=2)
    for field in ("x", "y", "first", "second", "labels", "index", "shifts"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    for other in (mm.train_pairs(x, y, seed=7, epoch=3), mm.train_pairs(x, y, seed=8, epoch=2)):
        assert not np.array_equal(a.shifts, other.shifts)
        assert not np.array_equal(a.index, other.index)
        assert not np.array_equal(a.x, other.x)


def test_test_pairs_fixed_sized_and_digit_major() -> None:
    n, k = 40, 3
    labels = np.arange(n) % 10
    x = pixel_digits(n)
    y = one_hot(labels)
    np.random.seed(5)
    a = mm.test_pairs(x, y, pairs_per_digit=k)
    mm.train_pairs(x, y, seed=123, epoch=4)  # a training epoch in between changes nothing
    np.random.seed(6)
    b = mm.test_pairs(x, y, pairs_per_digit=k)
    for field in ("x", "y", "first", "second", "labels", "index", "shifts"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert len(a) == n * k and a.x.shape == (n * k, OUT, OUT, 1)
    sources, shifts = decode(a)
    # Digit-major: images i*K .. i*K + K - 1 all have test digit i first.
    np.testing.assert_array_equal(sources[:, 0], np.repeat(np.arange(n), k))
    np.testing.assert_array_equal(sources, a.index)
    np.testing.assert_array_equal(shifts, a.shifts)
    partners = sources[:, 1].reshape(n, k)
    assert (labels[partners] != labels[:, None]).all()
    assert all(len(set(row)) == k for row in partners), "the K partners of a digit are distinct"
    assert np.abs(shifts).max() <= MAX_SHIFT
    np.testing.assert_array_equal(a.y.sum(axis=1), 2)
    # The default K, and K = 1 is its own fixed set.
    assert len(mm.test_pairs(x, y)) == n * mm.DEFAULT_TEST_PAIRS
    np.testing.assert_array_equal(mm.test_pairs(x, y, 1).index, mm.test_pairs(x, y, 1).index)


def test_test_partners_in_random_order() -> None:
    # 30 digits of class 0 and 3 of class 1, K = 3: every class-0 digit gets all three class-1
    # digits, in an order that varies from digit to digit (a sampler that fills the K slots in a
    # fixed way would always put the same partner first).
    labels = np.array([0] * 30 + [1] * 3)
    pairs = mm.test_pairs(pixel_digits(len(labels)), one_hot(labels, 2), pairs_per_digit=3)
    partners = decode(pairs)[0][:, 1].reshape(len(labels), 3)[:30]
    assert all(sorted(row) == [30, 31, 32] for row in partners)
    assert set(partners[:, 0]) == {30, 31, 32}
    assert len({tuple(row) for row in partners}) >= 4  # of the 6 orders


def test_shifts_cover_the_whole_range_uniformly() -> None:
    # 10 epochs x 100 digits: each of the 9 values of dx (and of dy), for each of the two digits, is
    # expected ~111 times; 60..170 is far outside chance yet fails for a shift stuck at 0 or capped.
    n = 100
    x = pixel_digits(n)
    y = one_hot(np.arange(n) % 10)
    found = np.concatenate([decode(mm.train_pairs(x, y, seed=0, epoch=e))[1] for e in range(10)])
    for digit in range(2):
        for axis in range(2):
            values, counts = np.unique(found[:, digit, axis], return_counts=True)
            assert set(values) == ALL_SHIFTS, (digit, axis, values)
            assert counts.min() > 60 and counts.max() < 170, (digit, axis, counts)
    test_found = decode(mm.test_pairs(x, y, pairs_per_digit=5))[1]
    for digit in range(2):
        for axis in range(2):
            assert set(test_found[:, digit, axis]) == ALL_SHIFTS


def test_pairs_reject_unusable_data() -> None:
    x = pixel_digits(4)
    with pytest.raises(ValueError, match="2 classes"):
        mm.train_pairs(x, one_hot([1, 1, 1, 1]), seed=0, epoch=0)
    with pytest.raises(ValueError):  # class 0 has only 1 digit of another class, K = 2 needs 2
        mm.test_pairs(x, one_hot([0, 0, 0, 1]), pairs_per_digit=2)
    with pytest.raises(ValueError):
        mm.test_pairs(x, one_hot([0, 1, 0, 1]), pairs_per_digit=0)
    with pytest.raises(ValueError):
        mm.train_pairs(x, one_hot([0, 1, 0, 1]), seed=-1, epoch=0)


# ---------------------------------------------------------------------------------------------
# Metric
# ---------------------------------------------------------------------------------------------


def two_hot(a: int, b: int, n_class: int = 10) -> np.ndarray:
    row = np.zeros(n_class, dtype=np.float32)
    row[[a, b]] = 1.0
    return row


def test_two_longest_longest_first() -> None:
    lengths = np.array([[0.1, 0.9, 0.3, 0.8], [0.7, 0.0, 0.95, 0.2]])
    np.testing.assert_array_equal(mm.two_longest(lengths), [[1, 3], [2, 0]])


def test_accuracy_both_one_none_and_order_free() -> None:
    base = np.full(10, 0.05)

    def lengths(long: dict[int, float]) -> np.ndarray:
        row = base.copy()
        for cls, value in long.items():
            row[cls] = value
        return row

    cases = [
        (lengths({3: 0.9, 7: 0.8}), two_hot(3, 7)),  # both right
        (lengths({3: 0.6, 7: 0.95}), two_hot(7, 3)),  # both right, the "second" label longest
        (lengths({3: 0.9, 5: 0.8}), two_hot(3, 7)),  # one right (3), 7 is only third
        (lengths({1: 0.9, 2: 0.8, 3: 0.7}), two_hot(3, 7)),  # none among the two longest
    ]
    capsule_lengths = np.stack([c[0] for c in cases])
    y = np.stack([c[1] for c in cases])
    scores = mm.accuracy(capsule_lengths, y)
    assert scores["both"] == pytest.approx(2 / 4)
    assert scores["at_least_one"] == pytest.approx(3 / 4)
    assert scores["error"] == pytest.approx(1 - 2 / 4)
    # One image at a time.
    assert [mm.accuracy(capsule_lengths[i : i + 1], y[i : i + 1])["both"] for i in range(4)] == [1, 1, 0, 0]
    assert [mm.accuracy(capsule_lengths[i : i + 1], y[i : i + 1])["at_least_one"] for i in range(4)] == [
        1, 1, 1, 0]
    with pytest.raises(ValueError):  # one-hot is not a MultiMNIST label
        mm.accuracy(capsule_lengths[:1], np.eye(10, dtype=np.float32)[[3]])


def test_accuracy_of_generated_pairs_with_perfect_and_swapped_lengths() -> None:
    # Lengths made from the pairs' own labels score 100%, in whichever order the two are longest.
    n = 30
    pairs = mm.test_pairs(pixel_digits(n), one_hot(np.arange(n) % 10), pairs_per_digit=2)
    rows = np.arange(len(pairs))
    for first_len, second_len in ((0.9, 0.8), (0.8, 0.9)):
        lengths = np.full((len(pairs), 10), 0.1)
        lengths[rows, pairs.labels[:, 0]] = first_len
        lengths[rows, pairs.labels[:, 1]] = second_len
        assert mm.accuracy(lengths, pairs.y) == {"both": 1.0, "at_least_one": 1.0, "error": 0.0}


# ---------------------------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------------------------


def tile(image: np.ndarray, row: int, col: int) -> np.ndarray:
    return image[row * OUT : (row + 1) * OUT, col * OUT : (col + 1) * OUT]


def test_overlay_image_gray_inputs_red_first_green_second() -> None:
    n = 60  # more than 50: only the first 50 are shown
    rng = np.random.default_rng(0)
    x = rng.random((n, OUT, OUT, 1), dtype=np.float32)
    first = np.zeros((n, OUT, OUT, 1), dtype=np.float32)
    second = np.zeros((n, OUT, OUT, 1), dtype=np.float32)
    first[:, :, :18] = 0.8  # the first reconstruction on the left half
    second[:, 10:, :] = 0.6  # the second on the bottom part
    first[7] = 0.25  # one image with its own recognisable reconstructions
    second[7] = 0.5
    image = plots.overlay_image(x, first, second)
    assert image.shape == (10 * OUT, 10 * OUT, 3)
    assert image.min() >= 0 and image.max() <= 1
    for k in range(50):
        top = tile(image, k // 10, k % 10)
        for channel in range(3):  # gray: R = G = B = the input
            np.testing.assert_array_equal(top[..., channel], x[k, ..., 0])
        bottom = tile(image, 5 + k // 10, k % 10)
        np.testing.assert_array_equal(bottom[..., 0], first[k, ..., 0])  # red: first digit
        np.testing.assert_array_equal(bottom[..., 1], second[k, ..., 0])  # green: second digit
        assert (bottom[..., 2] == 0).all()
    bottom = tile(image, 5, 7)
    assert (bottom[..., 0] == 0.25).all() and (bottom[..., 1] == 0.5).all()
    # Where only the first is drawn the pixel is pure red, where only the second pure green.
    np.testing.assert_allclose(tile(image, 5, 0)[0, 0], [0.8, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(tile(image, 5, 0)[20, 30], [0.0, 0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(tile(image, 5, 0)[20, 5], [0.8, 0.6, 0.0], rtol=1e-6)


def test_overlay_image_few_images_and_flat_reconstructions() -> None:
    # 12 images: 2 rows of inputs, the reconstructions start on row 3; decoder outputs may be flat.
    n = 12
    x = np.full((n, OUT, OUT, 1), 0.3, dtype=np.float32)
    first = np.full((n, OUT * OUT), 0.9, dtype=np.float32)
    second = np.full((n, OUT * OUT), 0.4, dtype=np.float32)
    image = plots.overlay_image(x, first, second)
    assert image.shape == (4 * OUT, 10 * OUT, 3)
    np.testing.assert_allclose(tile(image, 1, 1)[0, 0], [0.3, 0.3, 0.3], rtol=1e-6)
    assert (tile(image, 1, 2) == 0).all()  # image 12 does not exist: blank
    np.testing.assert_allclose(tile(image, 2, 0)[0, 0], [0.9, 0.4, 0.0])
    np.testing.assert_allclose(tile(image, 3, 1)[0, 0], [0.9, 0.4, 0.0])
    assert (tile(image, 3, 2) == 0).all()
