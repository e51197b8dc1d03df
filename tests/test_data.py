"""Task samplers: sinusoid ranges, Omniglot loader (official layout) and the N-way K-shot sampler."""
import io
import os
import zipfile

import numpy as np
import pytest
import torch

from pymaml.data import Omniglot, OmniglotTasks, SinusoidTasks, load_images
from pymaml.data import omniglot as om

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "omniglot"))
have_data = pytest.mark.skipif(not os.path.exists(os.path.join(DATA, "images_background.zip")),
                               reason=f"Omniglot archives not found in {DATA}")


def assert_state_round_trip(make, n):
    """A sampler restored from another's state_dict draws exactly what the original draws next."""
    a, b = make(), make()
    a.sample(n)
    state = a.state_dict()
    first = a.sample(n)
    b.load_state_dict(state)
    for u, v in zip(first, b.sample(n)):
        assert torch.equal(u, v)


def test_sinusoid_ranges_shapes_and_determinism():
    s = SinusoidTasks(shots=10, queries=7, seed=3)
    amp, ph = s.sample_functions(2000)
    assert 0.1 <= amp.min() and amp.max() <= 5.0 and 0 <= ph.min() and ph.max() <= np.pi
    x_s, y_s, x_q, y_q = s.sample(4)
    assert x_s.shape == (4, 10, 1) and y_s.shape == (4, 10, 1) and x_q.shape == (4, 7, 1)
    assert float(x_s.abs().max()) <= 5.0 and float(y_s.abs().max()) <= 5.0
    assert_state_round_trip(lambda: SinusoidTasks(seed=1), 3)


def test_sinusoid_targets_are_a_sine_of_the_inputs():
    s = SinusoidTasks(shots=50, queries=50, seed=0)
    x_s, y_s, x_q, y_q = s.sample(1)
    x = torch.cat([x_s[0, :, 0], x_q[0, :, 0]]).double()
    y = torch.cat([y_s[0, :, 0], y_q[0, :, 0]]).double()
    # y = A sin(x − φ) = a sin x + b cos x: an exact least-squares fit
    A = torch.stack([torch.sin(x), torch.cos(x)], 1)
    coef = torch.linalg.lstsq(A, y[:, None]).solution
    assert float((A @ coef - y[:, None]).abs().max()) < 1e-5


def test_missing_archives_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="images_background.zip not found"):
        om.find_archives(str(tmp_path), download=False)


def test_download_checks_the_md5(tmp_path, monkeypatch):
    def fake_retrieve(url, dest):
        assert url.startswith(om.URL_PREFIX) and url.endswith(".zip")
        with open(dest, "wb") as f:
            f.write(b"not the archive")
    monkeypatch.setattr(om.urllib.request, "urlretrieve", fake_retrieve)
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        om.find_archives(str(tmp_path), download=True)
    assert not any(p.name.endswith(".zip") for p in tmp_path.iterdir())


def _tiny_archive(path, name, chars):
    Image = pytest.importorskip("PIL.Image")
    with zipfile.ZipFile(path, "w") as z:
        for c in range(chars):
            for d in range(20):
                img = np.full((105, 105), 255, np.uint8)
                img[10 + c:30 + c, 40:45] = 0  # a stroke whose position identifies the character
                buf = io.BytesIO()
                Image.fromarray(img).convert("1").save(buf, format="PNG")
                z.writestr(f"{name}/Alpha/character{c + 1:02d}/{c:04d}_{d + 1:02d}.png", buf.getvalue())


def test_local_sha256sums_are_checked(tmp_path):
    for name in om.ARCHIVES:
        _tiny_archive(tmp_path / f"{name}.zip", name, 2)
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  images_background.zip\n")
    with pytest.raises(RuntimeError, match="SHA256SUMS"):
        load_images(str(tmp_path), download=False, cache_dir="")


def test_decoding_of_the_official_layout(tmp_path):
    for name, n in zip(om.ARCHIVES, (3, 2)):
        _tiny_archive(tmp_path / f"{name}.zip", name, n)
    names, images = load_images(str(tmp_path), download=False, cache_dir=str(tmp_path / "cache"))
    assert images.shape == (5, 20, 28, 28) and images.dtype == np.uint8
    assert names[0] == "images_background/Alpha/character01" and names[3].startswith("images_evaluation/")
    assert images.max() > 200 and images.mean() < 60  # strokes bright, background dark
    assert list((tmp_path / "cache").iterdir())  # cached for the next process


@have_data
def test_omniglot_reads_the_shared_archives_with_the_paper_split():
    names, images = load_images(DATA, download=False)
    assert images.shape == (1623, 20, 28, 28) and images.dtype == np.uint8
    assert sum(n.startswith("images_background/") for n in names) == 964
    splits = {s: Omniglot(DATA, s, download=False) for s in ("train", "val", "test", "train+val")}
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (1100, 100, 423)
    assert len(splits["train+val"]) == 1200
    seen = [set(splits[s].indices.tolist()) for s in ("train", "val", "test")]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert len(seen[0] | seen[1] | seen[2]) == 1623


@have_data
def test_omniglot_sampler_protocol_and_determinism():
    ds = Omniglot(DATA, "test", download=False)
    tasks = OmniglotTasks(ds, ways=5, shots=1, queries=1, seed=7)
    x_s, y_s, x_q, y_q = tasks.sample(8)
    assert x_s.shape == (8, 5, 1, 28, 28) and x_q.shape == (8, 5, 1, 28, 28)
    assert x_s.dtype == torch.float32 and 0 <= float(x_s.min()) and float(x_s.max()) <= 1
    for b in range(8):
        assert sorted(y_s[b].tolist()) == list(range(5)) and sorted(y_q[b].tolist()) == list(range(5))
    # every image is a (possibly rotated) image of the split's characters
    flat = ds.images.reshape(-1, 28, 28)
    img = (x_s[0, 0, 0] * 255).round().to(torch.uint8).numpy()
    assert any((np.rot90(img, -k)[None] == flat).all((1, 2)).any() for k in range(4))
    five = OmniglotTasks(ds, ways=20, shots=5, queries=15, seed=1).sample(1)
    assert five[0].shape == (1, 100, 1, 28, 28) and five[2].shape == (1, 300, 1, 28, 28)
    assert_state_round_trip(lambda: OmniglotTasks(ds, seed=3), 2)
    with pytest.raises(ValueError, match="exceeds 20 drawers"):
        OmniglotTasks(ds, shots=10, queries=11)


def assert_split_invariant(sampler, other_seed):
    """Tasks by global index: any split of a meta-batch gives the whole batch's tasks."""
    whole = sampler.tasks(range(4, 9))
    parts = [sampler.tasks(range(4, 7)), sampler.tasks([7]), sampler.tasks(range(8, 9))]
    for i, w in enumerate(whole):
        assert torch.equal(w, torch.cat([p[i] for p in parts]))
    assert all(torch.equal(u, v) for u, v in zip(sampler.tasks([6]), [t[2:3] for t in whole]))
    assert not torch.equal(other_seed.tasks(range(4, 9))[0], whole[0])
    assert not torch.equal(sampler.tasks(range(5, 10))[0], whole[0])
    empty = sampler.tasks(range(3, 3))
    assert all(e.shape[0] == 0 and e.shape[1:] == w.shape[1:] and e.dtype == w.dtype for e, w in zip(empty, whole))
    return whole


def test_sinusoid_tasks_by_global_index():
    x_s, y_s, x_q, y_q = assert_split_invariant(SinusoidTasks(10, 7, seed=3), SinusoidTasks(10, 7, seed=4))
    assert x_s.shape == (5, 10, 1) and x_q.shape == (5, 7, 1)
    assert float(x_s.abs().max()) <= 5 and float(y_q.abs().max()) <= 5


@have_data
def test_omniglot_tasks_by_global_index():
    ds = Omniglot(DATA, "val", download=False)
    x_s, y_s, _, _ = assert_split_invariant(OmniglotTasks(ds, seed=3), OmniglotTasks(ds, seed=4))
    assert x_s.shape == (5, 5, 1, 28, 28) and sorted(y_s[0].tolist()) == list(range(5))
