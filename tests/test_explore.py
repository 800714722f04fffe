"""The capsule explorer (`explore.py`, `-t --explore`), tested in a real browser.

Headless Chromium (Debian's `chromium`, driven over the DevTools protocol by `browser.py`) opens the
written page; what the page decodes and draws is compared with the Keras decoder's output for the same
capsule, computed here from capsules this test encodes itself with Keras: at first, after a slider is
moved with the keyboard as a user would, after the range is widened, and after another capsule is
chosen. The page must load with no console error and make no request but the file itself.

The model is a CapsNet with random weights (seeded), its digit-capsule weights scaled up so that the
capsules have lengths of ~0.3-0.7 as a trained model's do (at the glorot init they are ~1e-7 and every
reconstruction would be the same grey), and its last decoder layer scaled so the pictures span [0, 1].

Without Chromium the browser tests skip, unless `CI` is set (`.ci/run` installs it): then they fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from browser import Chromium, find_chromium
from conftest import save_npz, synthetic_raw

import capsulenet
from capsnet import errors, explore

# The page must equal the Keras decoder within this (the bound); measured: ~1e-7.
TOLERANCE = 1e-4
# A class name that would break out of the page's script element if it were not escaped.
HOSTILE_NAME = "</script><img src=x onerror=window.hacked=1>"


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    if find_chromium() is None:
        missing = "headless Chromium not found (apt-get install -y chromium)"
        if os.environ.get("CI"):  # .ci/run installs it: its absence is a broken CI, not a reason to skip
            pytest.fail(missing)
        pytest.skip(missing)
    with Chromium() as chromium:
        yield chromium


def lively_model(input_shape: tuple[int, int, int], seed: int) -> tuple:
    """A seeded random CapsNet (1 routing) whose capsules, biases and reconstructions vary as a
    trained one's."""
    import keras

    keras.utils.set_random_seed(seed)
    _, eval_model, _ = capsulenet.CapsNet(input_shape, 10, routings=1)
    digitcaps = eval_model.get_layer("digitcaps")
    digitcaps.W.assign(digitcaps.W * 3000.0)
    decoder = eval_model.get_layer("decoder")
    last = decoder.layers[-2]
    last.kernel.assign(last.kernel * 30.0)
    rng = np.random.default_rng(seed)
    for dense in decoder.layers[:-1]:  # biases start at zero; the page must add them
        dense.bias.assign(rng.normal(0.0, 0.3, dense.bias.shape).astype(np.float32))
    return eval_model


def keras_capsules(eval_model, x: np.ndarray) -> np.ndarray:
    """`[n, 10, 16]`, by Keras, for the reference."""
    import keras

    encoder = keras.Model(eval_model.inputs[0], eval_model.get_layer("digitcaps").output)
    return np.asarray(encoder.predict(x, verbose=0))


def keras_decode(eval_model, capsule: np.ndarray, cls: int, offsets: list[float] | None = None
                 ) -> np.ndarray:
    """The Keras decoder's output `[pixels]` for one capsule `[16]` (+ offsets) of class `cls`, the
    other nine masked to zero."""
    masked = np.zeros((1, 10, 16), np.float32)
    masked[0, cls] = capsule + np.asarray(offsets if offsets is not None else np.zeros(16), np.float32)
    return np.asarray(eval_model.get_layer("decoder").predict(masked.reshape(1, -1), verbose=0)).reshape(-1)


def page_pixels(browser: Chromium, canvas_id: str) -> np.ndarray:
    """The RGBA pixels drawn on a canvas, `[height * width, 4]`."""
    data = browser.evaluate(f"""(() => {{ const c = document.getElementById("{canvas_id}");
        return Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data); }})()""")
    return np.asarray(data, dtype=np.int64).reshape(-1, 4)


def as_bytes(values: np.ndarray) -> np.ndarray:
    """[0, 1] values as the 8-bit pixels they should be drawn as (the rounding of utils.save_image)."""
    return np.floor(np.clip(values, 0, 1) * 255 + 0.5).astype(np.int64)


def assert_page_matches(browser: Chromium, eval_model, capsules: np.ndarray) -> list[np.ndarray]:
    """The page's reconstructions for its current state equal Keras' within TOLERANCE, and the canvas
    shows them (gray for one, red and green for two). Returns Keras' outputs."""
    state = browser.evaluate("explorer.state()")
    page = [np.asarray(r) for r in browser.evaluate("explorer.reconstructions()")]
    expected = [keras_decode(eval_model, capsules[state["source_index"], cls], cls, offsets)
                for cls, offsets in zip(state["classes"], state["offsets"], strict=True)]
    for got, want in zip(page, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)
    drawn = page_pixels(browser, "recon-canvas")
    if len(expected) == 1:  # gray: one channel into R, G and B; colour: each its own
        channels = expected[0].reshape(len(drawn), -1)
        np.testing.assert_allclose(drawn[:, :3], np.broadcast_to(as_bytes(channels), (len(drawn), 3)),
                                   rtol=0, atol=1)
    else:
        np.testing.assert_allclose(drawn[:, 0], as_bytes(expected[0]), rtol=0, atol=1)
        np.testing.assert_allclose(drawn[:, 1], as_bytes(expected[1]), rtol=0, atol=1)
        assert drawn[:, 2].max() == 0
    assert (drawn[:, 3] == 255).all()
    return expected


def move_slider(browser: Chromium, group: int, dim: int, key: str, code: int, times: int = 1) -> None:
    """Focuses one slider and presses a key on it, as a user would."""
    browser.evaluate(f'document.querySelector(\'input[data-group="{group}"][data-dim="{dim}"]\').focus()')
    for _ in range(times):
        browser.press_key(key, code)


def choose(browser: Chromium, selector: str, value: str) -> None:
    """Chooses an option of a <select>, firing its `change` event as the browser does for a user."""
    browser.evaluate(f"""(() => {{ const s = document.querySelector('{selector}'); s.value = "{value}";
        s.dispatchEvent(new Event("change")); }})()""")


# ---------------------------------------------------------------------------------------------
# Without a browser
# ---------------------------------------------------------------------------------------------


def test_pick_images_takes_the_first_of_each_class_in_order() -> None:
    labels = np.array([2, 0, 2, 1, 0, 2, 0])
    assert explore.pick_images(labels, 3, 2).tolist() == [1, 4, 3, 0, 2]
    assert explore.pick_images(labels, 4, 1).tolist() == [1, 3, 0]  # class 3 has none


def test_render_escapes_what_could_close_the_script() -> None:
    template = "<script>__EXPLORER_DATA__</script>"
    page = explore.render({"name": HOSTILE_NAME}, template)
    assert page.count("<") == 2 and "\\u003c/script>" in page
    with pytest.raises(ValueError, match="exactly once"):
        explore.render({}, "no placeholder")


def test_decoder_layers_refuse_what_the_page_cannot_run() -> None:
    import keras

    tanh = keras.Sequential([keras.layers.Input((160,)), keras.layers.Dense(4, activation="tanh")])
    with pytest.raises(ValueError, match="tanh"):
        explore.decoder_layers(tanh)
    conv = keras.Sequential([keras.layers.Input((160,)), keras.layers.Reshape((10, 16)),
                             keras.layers.Conv1D(2, 3)])
    with pytest.raises(ValueError, match="Conv1D"):
        explore.decoder_layers(conv)
    plain = keras.Sequential([keras.layers.Input((160,)), keras.layers.Dense(3, use_bias=False)])
    (layer,) = explore.decoder_layers(plain)
    assert (layer["units_in"], layer["units_out"], layer["activation"]) == (160, 3, "linear")
    assert layer["bias"].tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------------------------
# In the browser
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_digit(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    eval_model = lively_model((28, 28, 1), seed=1)
    (_, _), (x, y) = synthetic_raw(0, 30, seed=2)
    x = x[..., None].astype(np.float32) / 255
    names = [f"digit {k}" for k in range(9)] + [HOSTILE_NAME]
    path = explore.write_explorer(eval_model, x, y, names, tmp_path_factory.mktemp("explore") / "e.html",
                                  n_per_class=2, title="synthetic")
    return eval_model, x, y, keras_capsules(eval_model, x), path


def test_page_decodes_and_draws_what_keras_decodes(browser: Chromium, one_digit: tuple) -> None:
    eval_model, x, y, capsules, path = one_digit
    browser.open(path)
    assert browser.errors() == []
    assert browser.requests() == [path.resolve().as_uri()]  # nothing from a server or the internet
    assert browser.evaluate("explorer.count") == 20
    assert browser.evaluate("window.hacked === undefined")  # the hostile class name stayed text
    assert HOSTILE_NAME in browser.evaluate("document.getElementById('gallery').textContent")

    # The first image of class 0, its label's capsule, all offsets zero.
    state = browser.evaluate("explorer.state()")
    assert (state["source_index"], state["classes"], state["range"]) == (0, [int(y[0])], 0.25)
    np.testing.assert_allclose(browser.evaluate("explorer.lengths(0)"),
                               np.linalg.norm(capsules[0], axis=-1), rtol=0, atol=1e-6)
    shown = page_pixels(browser, "input-canvas")[:, 0]
    assert shown.tolist() == as_bytes(x[0].reshape(-1)).tolist()
    before = assert_page_matches(browser, eval_model, capsules)[0]

    # A slider moved by 5 key presses (steps of 0.01): a new picture, still Keras'.
    move_slider(browser, 0, 3, "ArrowRight", 39, times=5)
    offsets = browser.evaluate("explorer.state()")["offsets"][0]
    assert offsets == pytest.approx([0.0] * 3 + [0.05] + [0.0] * 12)
    after = assert_page_matches(browser, eval_model, capsules)[0]
    assert np.abs(after - before).max() > 1e-3

    # The wider range: End takes a slider to its end, +1.
    choose(browser, "#range", "1")
    move_slider(browser, 0, 7, "End", 35)
    offsets = browser.evaluate("explorer.state()")["offsets"][0]
    assert offsets[7] == 1 and offsets[3] == pytest.approx(0.05)
    assert_page_matches(browser, eval_model, capsules)

    # Another image (a click on its thumbnail), then another class's capsule (the select box).
    browser.evaluate("document.querySelectorAll('.thumb')[7].click()")
    state = browser.evaluate("explorer.state()")
    assert state["index"] == 7 and state["offsets"][0] == [0] * 16
    choose(browser, ".capsule-select", "6")
    assert browser.evaluate("explorer.state()")["classes"] == [6]
    move_slider(browser, 0, 0, "ArrowLeft", 37, times=2)
    assert_page_matches(browser, eval_model, capsules)
    assert browser.errors() == []


def test_two_digit_page_draws_both_capsules_red_and_green(browser: Chromium, tmp_path: Path) -> None:
    from capsnet import multimnist

    eval_model = lively_model((36, 36, 1), seed=3)
    (_, _), (x, y) = synthetic_raw(0, 20, seed=4)
    pairs = multimnist.test_pairs(x[..., None].astype(np.float32) / 255, np.eye(10, dtype="float32")[y], 1)
    path = explore.write_explorer(eval_model, pairs.x, pairs.labels, [str(k) for k in range(10)],
                                  tmp_path / "e.html", n_per_class=1)
    capsules = keras_capsules(eval_model, pairs.x)
    browser.open(path)
    assert browser.errors() == []
    state = browser.evaluate("explorer.state()")
    assert state["classes"] == pairs.labels[state["source_index"]].tolist()
    assert browser.evaluate("document.querySelectorAll('#groups input[type=range]').length") == 32
    assert_page_matches(browser, eval_model, capsules)
    move_slider(browser, 1, 5, "ArrowLeft", 37, times=10)  # the green digit's dimension 5, -0.1
    offsets = browser.evaluate("explorer.state()")["offsets"]
    assert offsets[0] == [0] * 16 and offsets[1][5] == pytest.approx(-0.1)
    assert_page_matches(browser, eval_model, capsules)
    assert browser.errors() == []


def test_colour_page_draws_each_channel(browser: Chromium, tmp_path: Path) -> None:
    """32x32 RGB images (CIFAR-10's shape): the decoder's 3,072 outputs are drawn as R, G and B."""
    eval_model = lively_model((32, 32, 3), seed=5)
    (_, _), (x, y) = synthetic_raw(0, 10, size=32, channels=3, seed=6)
    x = x.astype(np.float32) / 255
    path = explore.write_explorer(eval_model, x, y, [str(k) for k in range(10)], tmp_path / "e.html",
                                  n_per_class=1)
    capsules = keras_capsules(eval_model, x)
    browser.open(path)
    assert browser.errors() == []
    shown = page_pixels(browser, "input-canvas")[:, :3]
    assert shown.tolist() == as_bytes(x[0].reshape(-1, 3)).tolist()
    move_slider(browser, 0, 9, "ArrowLeft", 37, times=3)
    assert_page_matches(browser, eval_model, capsules)
    assert browser.errors() == []


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_cli_writes_the_page_with_t_and_refuses_it_without(tmp_path: Path, capsys) -> None:
    npz = save_npz(tmp_path / "d.npz", synthetic_raw(20, 20))
    flags = ["--dataset", str(npz), "-r", "1", "--save_dir", str(tmp_path / "out"), "--explore"]
    assert capsulenet.main(flags) == errors.EXIT_BAD_INPUT
    assert "--explore" in capsys.readouterr().err
    assert not (tmp_path / "out" / "explore.html").exists()
    assert capsulenet.main(["-t", *flags]) == 0
    page = (tmp_path / "out" / "explore.html").read_text()
    assert "d.npz: test images, random weights (no -w)" in page and "__EXPLORER_DATA__" not in page
    assert "Capsule explorer saved to" in capsys.readouterr().out
    # MultiMNIST: the pairs and both digits' labels reach the page.
    assert capsulenet.main(["-t", *flags, "--multimnist", "--multimnist_test_pairs", "1",
                            "--save_dir", str(tmp_path / "mm")]) == 0
    page = (tmp_path / "mm" / "explore.html").read_text()
    assert '"two_digits":true' in page and '"image_shape":[36,36,1]' in page
