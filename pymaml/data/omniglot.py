"""Omniglot (Lake et al. 2015) with the MAML paper's few-shot protocol.

Reads the official archive layout straight from a folder, without unpacking::

    DIR/images_background.zip   images_background/<Alphabet>/characterNN/XXXX_YY.png  (964 chars)
    DIR/images_evaluation.zip   images_evaluation/<Alphabet>/characterNN/XXXX_YY.png  (659 chars)

When an archive is missing and ``download=True`` it is fetched from the official repository and its
MD5 checked against the published value. If a ``SHA256SUMS`` file sits beside local archives, they
are checked against it.

Protocol (Finn et al. 2017, following Santoro et al. 2016 and the MAML code): both archives pooled
(1623 characters, 20 drawers each), every image resized to 28×28 (Lanczos) and inverted so strokes
are 1; characters shuffled once with a fixed seed; the first 1200 are for meta-training (of which
the last 100 are held out for validation, as in the MAML code), the remaining 423 for meta-testing.
Each class in a task gets a random multiple of 90° rotation, which makes rotated characters new
classes. Decoded images are kept in memory as one uint8 array (and cached on disk as ``.npy``).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import urllib.request
import zipfile
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .seeding import indices as _indices, task_rng

log = logging.getLogger(__name__)

ARCHIVES = ("images_background", "images_evaluation")
URL_PREFIX = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
MD5 = {"images_background": "68d2efa1b9178cc56df9314c21c6e718",
       "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
IMAGE_SIZE = 28
DRAWERS = 20


def _digest(path: str, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(name: str, root: str) -> str:
    os.makedirs(root, exist_ok=True)
    dest = os.path.join(root, name + ".zip")
    url = f"{URL_PREFIX}/{name}.zip"
    log.info("omniglot: downloading %s", url)
    tmp = dest + ".part"
    try:
        urllib.request.urlretrieve(url, tmp)
    except OSError as e:
        raise RuntimeError(f"omniglot: {name}.zip is not in {root!r} and downloading {url} failed "
                           f"({e}); put the official archives in that folder or pass --data DIR") from e
    got = _digest(tmp, "md5")
    if got != MD5[name]:
        os.remove(tmp)
        raise RuntimeError(f"omniglot: checksum mismatch for {url}: md5 {got}, expected {MD5[name]}")
    os.replace(tmp, dest)
    return dest


def _check_local(root: str, paths: Dict[str, str]) -> None:
    sums = os.path.join(root, "SHA256SUMS")
    if not os.path.exists(sums):
        return
    expected = {}
    with open(sums) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                expected[parts[1].lstrip("*")] = parts[0]
    for name, path in paths.items():
        want = expected.get(os.path.basename(path))
        if want is not None and _digest(path, "sha256") != want:
            raise RuntimeError(f"omniglot: {path} does not match its SHA256SUMS entry {want}")


def find_archives(root: str, download: bool = True) -> Dict[str, str]:
    """Paths of both archives in ``root``; downloads what is missing when allowed."""
    root = os.path.expanduser(root)
    paths = {}
    for name in ARCHIVES:
        p = os.path.join(root, name + ".zip")
        if not os.path.exists(p):
            if not download:
                raise FileNotFoundError(f"omniglot: {p} not found (download=False)")
            p = _download(name, root)
        paths[name] = p
    return paths


def _decode_archive(path: str, size: int) -> Tuple[List[str], np.ndarray]:
    try:
        return _decode_zip(path, size)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise RuntimeError(f"omniglot: {path} is not a readable zip archive ({type(e).__name__}: {e}); "
                           f"delete it and download it again (or copy the official archive there)") from e


def _decode_zip(path: str, size: int) -> Tuple[List[str], np.ndarray]:
    from PIL import Image, UnidentifiedImageError  # optional dependency, only needed to decode

    resample = getattr(Image, "Resampling", Image).LANCZOS
    with zipfile.ZipFile(path) as z:
        chars: Dict[str, List[str]] = {}
        for n in z.namelist():
            if n.endswith(".png"):
                chars.setdefault(os.path.dirname(n), []).append(n)
        names = sorted(chars)
        if not names:
            raise RuntimeError(f"omniglot: {path} holds no .png images (expected the official layout "
                               f"<archive>/<Alphabet>/characterNN/*.png)")
        out = np.empty((len(names), DRAWERS, size, size), dtype=np.uint8)
        for ci, c in enumerate(names):
            files = sorted(chars[c])
            if len(files) != DRAWERS:
                raise RuntimeError(f"omniglot: {path}:{c} holds {len(files)} images, expected {DRAWERS}")
            for di, f in enumerate(files):
                try:
                    im = Image.open(io.BytesIO(z.read(f))).convert("L")
                except (UnidentifiedImageError, OSError) as e:
                    raise RuntimeError(f"omniglot: {path}:{f} is not a readable image ({e})") from e
                if im.size != (size, size):
                    im = im.resize((size, size), resample=resample)
                out[ci, di] = 255 - np.asarray(im, dtype=np.uint8)  # strokes bright
    return names, out


def _cache_path(paths: Dict[str, str], size: int, cache_dir: Optional[str]) -> Optional[str]:
    if cache_dir is None:
        cache_dir = os.environ.get("PYMAML_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pymaml"))
    if not cache_dir:
        return None
    key = hashlib.sha1(repr(sorted((os.path.basename(p), os.path.getsize(p)) for p in paths.values())).encode()
                       + str(size).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"omniglot_{size}_{key}.npz")


_MEMORY: Dict[Tuple, Tuple[List[str], np.ndarray]] = {}


def load_images(root: str, download: bool = True, size: int = IMAGE_SIZE,
                cache_dir: Optional[str] = None) -> Tuple[List[str], np.ndarray]:
    """All 1623 characters: (names, uint8 array [chars, 20, size, size], strokes = 255).

    Names are ``images_background/<Alphabet>/characterNN`` etc. in sorted order, background first.
    Decoding takes a few seconds; the result is memoised per process and cached on disk
    (``cache_dir``, default ``$PYMAML_CACHE`` or ``~/.cache/pymaml``; "" disables it).
    """
    paths = find_archives(root, download)
    key = (tuple(sorted(paths.values())), size)
    if key in _MEMORY:
        return _MEMORY[key]
    cache = _cache_path(paths, size, cache_dir)
    if cache and os.path.exists(cache):
        with np.load(cache) as z:
            result = (list(z["names"]), z["images"])
        _MEMORY[key] = result
        return result
    _check_local(os.path.dirname(paths[ARCHIVES[0]]), paths)
    names, arrays = [], []
    for name in ARCHIVES:
        n, a = _decode_archive(paths[name], size)
        names += n
        arrays.append(a)
    images = np.concatenate(arrays)
    if cache:
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            tmp = cache + f".{os.getpid()}.tmp.npz"
            np.savez(tmp, names=np.array(names), images=images)
            os.replace(tmp, cache)
        except OSError as e:  # a read-only home is not an error
            log.warning("omniglot: could not write cache %s: %s", cache, e)
    _MEMORY[key] = (names, images)
    return names, images


class Omniglot:
    """The pooled Omniglot characters split as in the MAML code.

    ``split``: "train" (first 1200 − ``val_characters``), "val" (the next ``val_characters``),
    "test" (the remaining 423) or "train+val" (all 1200). ``images`` is a uint8 array
    [characters, 20, 28, 28]; ``names`` the matching character folders.
    """

    SPLITS = ("train", "val", "test", "train+val")

    def __init__(self, root: str, split: str = "train", *, download: bool = True,
                 train_characters: int = 1200, val_characters: int = 100, split_seed: int = 1,
                 size: int = IMAGE_SIZE, cache_dir: Optional[str] = None):
        if split not in self.SPLITS:
            raise ValueError(f"Omniglot: split must be one of {self.SPLITS}, got {split!r}")
        names, images = load_images(root, download, size, cache_dir)
        if not 0 <= val_characters < train_characters < len(names):
            raise ValueError(f"Omniglot: need 0 <= val_characters < train_characters < {len(names)}, "
                             f"got {val_characters} and {train_characters}")
        order = np.random.default_rng(split_seed).permutation(len(names))
        n_train = train_characters - val_characters
        idx = {"train": order[:n_train], "val": order[n_train:train_characters],
               "test": order[train_characters:], "train+val": order[:train_characters]}[split]
        self.split = split
        self.indices = np.sort(idx)
        self.images = images[self.indices]
        self.names = [names[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.images)


class OmniglotTasks:
    """N-way K-shot task sampler, deterministic given ``seed``.

    Each task: ``ways`` distinct characters, each rotated by a random multiple of 90° (applied to all
    its images), ``shots`` support and ``queries`` query images per class from distinct drawers.
    Labels are 0…ways−1 in a random order. ``sample(batch)`` returns float tensors
    x_s [batch, ways·shots, 1, 28, 28], y_s [batch, ways·shots] (int64), x_q, y_q likewise.
    The sampler's whole state is ``state_dict()`` (a numpy PCG64 state), for exact resumption.
    ``tasks(indices)`` returns the tasks with the given global indices, each from its own stream of
    (``seed``, index) (:mod:`pymaml.data.seeding`), independent of how a meta-batch is split.
    """

    def __init__(self, dataset: Omniglot, ways: int = 5, shots: int = 1, queries: int = 1,
                 seed: int = 0, rotations: Sequence[int] = (0, 1, 2, 3),
                 dtype: torch.dtype = torch.float32, device="cpu"):
        if ways > len(dataset):
            raise ValueError(f"OmniglotTasks: ways={ways} exceeds the {len(dataset)} characters of "
                             f"split {dataset.split!r}")
        if shots + queries > DRAWERS:
            raise ValueError(f"OmniglotTasks: shots + queries = {shots + queries} exceeds {DRAWERS} drawers")
        self.dataset, self.ways, self.shots, self.queries = dataset, ways, shots, queries
        self.rotations = np.asarray(rotations, dtype=np.int64)
        self.dtype, self.device, self.seed = dtype, device, int(seed)
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]

    def _one(self, rng: Optional[np.random.Generator] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rng = self.rng if rng is None else rng
        n, k, q = self.ways, self.shots, self.queries
        chars = rng.choice(len(self.dataset), size=n, replace=False)
        rots = rng.choice(self.rotations, size=n)
        xs = np.empty((n, k + q) + self.dataset.images.shape[2:], dtype=np.uint8)
        for j, (c, r) in enumerate(zip(chars, rots)):
            drawers = rng.choice(DRAWERS, size=k + q, replace=False)
            xs[j] = np.rot90(self.dataset.images[c, drawers], k=int(r), axes=(1, 2))
        labels = np.repeat(np.arange(n), k + q).reshape(n, k + q)
        perm = rng.permutation(n)  # random label assignment
        labels = perm[labels]
        sup = xs[:, :k].reshape((n * k,) + xs.shape[2:]), labels[:, :k].reshape(-1)
        qry = xs[:, k:].reshape((n * q,) + xs.shape[2:]), labels[:, k:].reshape(-1)
        return sup[0], sup[1], qry[0], qry[1]

    def sample(self, batch: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._stack([self._one() for _ in range(batch)])

    def tasks(self, ix) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tasks with global indices ``ix`` (e.g. ``range(start, stop)``), stacked."""
        return self._stack([self._one(task_rng(self.seed, i)) for i in _indices(ix)])

    def _stack(self, parts):
        side = self.dataset.images.shape[2:]
        n_s, n_q = self.ways * self.shots, self.ways * self.queries
        empty = [((n_s,) + side, np.uint8), ((n_s,), np.int64), ((n_q,) + side, np.uint8), ((n_q,), np.int64)]
        def stack(i):
            return np.stack([p[i] for p in parts]) if parts else np.empty((0,) + empty[i][0], empty[i][1])
        def images(i):
            a = stack(i)[:, :, None]
            return torch.from_numpy(a).to(device=self.device, dtype=self.dtype).div_(255.0)
        def labels(i):
            return torch.from_numpy(stack(i)).to(device=self.device, dtype=torch.long)
        return images(0), labels(1), images(2), labels(3)
