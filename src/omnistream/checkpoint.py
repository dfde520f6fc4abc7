"""Loading a Qwen2.5-Omni checkpoint directory (released layout) into our modules.

- ``resolve_model_dir``: a local directory, or a Hugging Face hub id fetched with
  ``snapshot_download`` (which also finds an already-cached snapshot when offline).
- ``load_component(dir, "thinker" | "talker" | "token2wav")``: builds the module without
  allocating its parameters (they live on the ``meta`` device; buffers are computed for real, so
  non-persistent buffers such as rotary ``inv_freq`` are correct), checks names and shapes against
  the safetensors headers, then assigns memory-mapped tensors (``safe_open``) in place of the meta
  parameters. When the stored dtype is the requested one and the device is the CPU, no copy is
  made at all; otherwise each tensor is converted once, on its own. Only the shards holding the
  part's prefix are opened and only that part's tensors are read.
- ``load_speakers``: the voices in ``spk_dict.pt``.

Errors that a user can fix (wrong directory, missing or damaged files, a checkpoint for another
configuration) raise :class:`CheckpointError` with a message that names the problem.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from omnistream.config import OmniConfig

Part = Literal["thinker", "talker", "token2wav"]
PARTS: tuple[str, ...] = ("thinker", "talker", "token2wav")  # the release's components
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SPEAKERS_FILE = "spk_dict.pt"

# part -> (module path, class name, attribute of OmniConfig holding its config)
_COMPONENTS: dict[str, tuple[str, str, str]] = {
    "thinker": ("omnistream.nn.thinker", "Thinker", "thinker_config"),
    "talker": ("omnistream.nn.talker", "Talker", "talker_config"),
    "token2wav": ("omnistream.nn.token2wav", "Token2Wav", "token2wav_config"),
    # omnistream's speech tokenizer (not in the release; present when the config has it)
    "codec_encoder": ("omnistream.codec.encoder", "SpeechEncoder", "codec_encoder_config"),
}

# The one table of dtype names (CLI flags, Engine.load, training stages): name -> torch dtype.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "f16": "float16", "half": "float16"}


class CheckpointError(RuntimeError):
    """A checkpoint directory or file that cannot be used, with the reason."""


class UnknownSpeakerError(CheckpointError, LookupError):
    """A voice name that ``spk_dict.pt`` does not have (the message lists the ones it has)."""


def _listing(names, limit: int = 10) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------
# Directory and config


def resolve_model_dir(dir_or_hub_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint directory for ``dir_or_hub_id``.

    A path to an existing directory is used as is (it must hold ``config.json``). Anything else
    that looks like a hub id (``Qwen/Qwen2.5-Omni-7B``) is fetched with
    ``huggingface_hub.snapshot_download`` (offline, only an already-cached snapshot is found).
    """
    p = Path(dir_or_hub_id).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CheckpointError(
                f"{p} is not a Qwen2.5-Omni checkpoint directory: it has no config.json"
            )
        return p
    s = str(dir_or_hub_id)
    if p.exists():
        raise CheckpointError(f"{p} is a file; expected a checkpoint directory")
    if s.count("/") != 1 or s.startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint directory {p} does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=s, revision=revision)
    except Exception as e:  # offline, unknown repo, network: one actionable message
        raise CheckpointError(
            f"{s!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Without network access, download the checkpoint "
            f"elsewhere (`huggingface-cli download {s} --local-dir DIR`) and pass that local "
            f"directory instead."
        ) from e
    return resolve_model_dir(local)


def load_config(model_dir: str | os.PathLike) -> OmniConfig:
    """The checkpoint's ``config.json`` as an :class:`OmniConfig`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{Path(model_dir)} has no config.json")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict) or "thinker_config" not in d:
        raise CheckpointError(
            f"{path} is not a Qwen2.5-Omni config (model_type {d.get('model_type')!r}, "
            "no thinker_config)"
            if isinstance(d, dict)
            else f"{path} does not hold a JSON object"
        )
    return OmniConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------
# Safetensors: index, headers, reading


def weight_map(model_dir: str | os.PathLike) -> dict[str, str]:
    """``{tensor name: shard file name}`` from the index, or from the single weights file."""
    d = Path(model_dir)
    index = d / INDEX_FILE
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        return dict(wm)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{d} holds no weights ({INDEX_FILE} or *.safetensors)")
    if len(files) > 1 and (d / SINGLE_FILE) not in files:
        raise CheckpointError(
            f"{d} holds {len(files)} safetensors files but no {INDEX_FILE} to say which is which"
        )
    single = d / SINGLE_FILE if (d / SINGLE_FILE).is_file() else files[0]
    with _open(single) as f:
        return {k: single.name for k in f.keys()}


@contextmanager
def _open(path: Path):
    """``safe_open`` with errors that name the file."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing (listed in {INDEX_FILE})")
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from e
    with f:
        yield f


class _Mapped:
    """A safetensors file whose tensors are views of one copy-on-write memory map of it: loading
    reads each byte once, straight into the pages the model then uses (no second copy; pages
    stay shared with the OS file cache until something writes to them)."""

    def __init__(self, path: Path):
        import mmap

        self.path = path
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            self.header = json.loads(fh.read(n))
            self.base = 8 + n
            self.map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        _register_map(self.map)

    def get_tensor(self, name: str) -> Tensor:
        info = self.header[name]
        dtype = _ST_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        if self.base + end > len(self.map):
            raise CheckpointError(f"{self.path} is truncated: {name} ends at byte "
                                  f"{self.base + end}, the file has {len(self.map)}")
        shape = tuple(info["shape"])
        count = (end - start) // dtype.itemsize
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        off = self.base + start
        if off % dtype.itemsize:  # misaligned in the file: copy rather than view
            return torch.frombuffer(bytearray(self.map[off:off + end - start]), dtype=dtype
                                    ).reshape(shape)
        return torch.frombuffer(self.map, dtype=dtype, count=count, offset=off).reshape(shape)

    def release(self, name: str) -> None:
        """Give back the pages of a tensor that was copied elsewhere (a dtype or device change),
        so loading never holds the file and the converted weights at once. Pages are clean
        (nothing was written), so a neighbour sharing one just reads it from the file again."""
        import mmap

        start, end = self.header[name]["data_offsets"]
        lo = (self.base + start) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = self.base + end
        if hasattr(self.map, "madvise") and hi > lo:
            self.map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


# (address, length, map) of every file mapping made for loading, while the map lives
_MAPS: list[tuple[int, int, weakref.ref]] = []


def _register_map(m) -> None:
    if len(m) == 0:
        return
    addr = torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr()
    _MAPS[:] = [e for e in _MAPS if e[2]() is not None]
    _MAPS.append((addr, len(m), weakref.ref(m)))


def release_pages(t: Tensor) -> bool:
    """Hand back the resident pages of ``t`` when it is a view of a weights file mapped by the
    loader (for a tensor whose values now live elsewhere, e.g. re-laid out by
    ``engine/layout.py``). Only pages wholly inside ``t`` are dropped; they are clean, so if
    anything still reads ``t`` it sees the file's values again. Returns True when released."""
    import mmap

    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return False
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    for addr, n, ref in _MAPS:
        m = ref()
        if m is None or not (addr <= lo and hi <= addr + n) or not hasattr(m, "madvise"):
            continue
        page = mmap.PAGESIZE
        start = -(-(lo - addr) // page) * page
        end = (hi - addr) // page * page
        if end > start:
            m.madvise(mmap.MADV_DONTNEED, start, end - start)
        return True
    return False


def _open_mapped(path: Path) -> _Mapped:
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing (listed in {INDEX_FILE})")
    try:
        return _Mapped(path)
    except (OSError, ValueError) as e:  # ValueError: a header that is not JSON / empty file
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


@dataclass
class _Stored:
    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def _headers(model_dir: Path, names: dict[str, str]) -> dict[str, _Stored]:
    """Shape and dtype of each named tensor, read from the headers of the files that hold them."""
    out: dict[str, _Stored] = {}
    by_file: dict[str, list[str]] = {}
    for name, fname in names.items():
        by_file.setdefault(fname, []).append(name)
    for fname, keys in sorted(by_file.items()):
        with _open(model_dir / fname) as f:
            present = set(f.keys())
            absent = [k for k in keys if k not in present]
            if absent:
                raise CheckpointError(
                    f"{model_dir / fname} lacks tensors that {INDEX_FILE} places there: "
                    + _listing(absent)
                )
            for k in keys:
                sl = f.get_slice(k)
                dt = _ST_DTYPES.get(str(sl.get_dtype()))
                if dt is None:
                    raise CheckpointError(f"{k}: unsupported dtype {sl.get_dtype()}")
                out[k] = _Stored(fname, tuple(sl.get_shape()), dt)
    return out


def read_tensors(
    model_dir: str | os.PathLike, prefix: str = "", names: list[str] | None = None
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, tensor)`` for stored tensors whose name starts with ``prefix`` (or for the
    given ``names``), shard by shard; the tensors are memory-mapped views of the files."""
    d = Path(model_dir)
    wm = weight_map(d)
    wanted = names if names is not None else [k for k in wm if k.startswith(prefix)]
    by_file: dict[str, list[str]] = {}
    for k in wanted:
        if k not in wm:
            raise CheckpointError(f"tensor {k} is not in the checkpoint at {d}")
        by_file.setdefault(wm[k], []).append(k)
    for fname in sorted(by_file):
        f = _open_mapped(d / fname)
        for k in by_file[fname]:
            yield k, _get(f, d / fname, k)


def _get(f, path: Path, name: str) -> Tensor:
    try:
        return f.get_tensor(name)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensor {name}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Building without allocating parameters


@contextmanager
def parameters_on_meta():
    """Inside this context new ``nn.Parameter``s are moved to the ``meta`` device as soon as they
    are registered, while buffers are computed normally. The ``torch.nn.init`` initialisers skip
    meta tensors: on meta they would run torch's Python reference kernels, whose first use imports
    ``torch._dynamo`` (2 s, the whole cost of building a 0.45B Thinker before this). A 7B model
    builds in well under a second with a few MB of memory and correct non-persistent buffers."""
    import torch.nn.init as init

    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    def skip_meta(fn):
        def init_(tensor, *args, **kwargs):
            return tensor if tensor.device.type == "meta" else fn(tensor, *args, **kwargs)

        return init_

    inits = {n: getattr(init, n) for n in _INITS if hasattr(init, n)}
    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    for n, fn in inits.items():
        setattr(init, n, skip_meta(fn))
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
        for n, fn in inits.items():
            setattr(init, n, fn)


# torch.nn.init's in-place initialisers (the ones module constructors call)
_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_",
          "dirac_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
          "orthogonal_", "sparse_")


def component_factory(part: str) -> Callable[[OmniConfig], nn.Module]:
    """``cfg -> module`` for ``part`` (imports ``omnistream.nn.<part>`` lazily)."""
    if part not in _COMPONENTS:
        raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")
    mod_name, cls_name, cfg_attr = _COMPONENTS[part]

    def build(cfg: OmniConfig) -> nn.Module:
        import importlib

        cls = getattr(importlib.import_module(mod_name), cls_name)
        return cls(getattr(cfg, cfg_attr))

    return build


def build_component(
    part: str, config: OmniConfig, factory: Callable[[OmniConfig], nn.Module] | None = None
) -> nn.Module:
    """The module for ``part`` with parameters on ``meta`` (see :func:`parameters_on_meta`)."""
    with parameters_on_meta():
        return (factory or component_factory(part))(config)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a name in ``DTYPES`` (or an alias: fp32, bf16, fp16, half, ...; a
    ``torch.`` prefix is fine), a dtype itself, or None / "auto" (None: keep what is stored).
    An unknown name raises ValueError listing the known ones."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    name = str(dtype).lower().removeprefix("torch.")
    try:
        return DTYPES[_DTYPE_ALIASES.get(name, name)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}") from None


def _set(module: nn.Module, name: str, value: Tensor, is_param: bool) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if is_param:
        owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value


# ---------------------------------------------------------------------------------------------
# Loading


def load_component(
    model_dir: str | os.PathLike,
    part: Part,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    *,
    config: OmniConfig | None = None,
    quiet: bool = False,
    factory: Callable[[OmniConfig], nn.Module] | None = None,
) -> nn.Module:
    """Build ``part`` ("thinker", "talker" or "token2wav") and load its weights.

    ``dtype``: float32 / bfloat16 / float16 (or None = as stored); token2wav is always float32.
    Floating parameters and buffers are cast (as ``module.to(dtype)`` would). ``device``: where
    the weights go. ``factory``: ``cfg -> module`` to build instead of the part's class. Only the
    tensors named ``<part>.*`` are read; a stored tensor that the module keeps as a non-persistent
    buffer (e.g. the DiT's ``rotary_embed.inv_freq``) replaces the computed value. The module is
    returned in eval mode.
    """
    if part not in _COMPONENTS:
        raise ValueError(f"unknown part {part!r}; expected one of {tuple(_COMPONENTS)}")
    d = resolve_model_dir(model_dir)
    cfg = config if config is not None else load_config(d)
    want = torch.float32 if part in ("token2wav", "codec_encoder") else resolve_dtype(dtype)
    device = torch.device(device)

    module = build_component(part, cfg, factory)

    # What the module expects: parameters (with tied aliases) and buffers.
    params: dict[str, nn.Parameter] = dict(module.named_parameters(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    for n, p in params.items():
        aliases.setdefault(id(p), []).append(n)
    buffers: dict[str, Tensor] = dict(module.named_buffers(remove_duplicate=False))

    # What the checkpoint has for this part (only this part's names are looked at).
    prefix = part + "."
    wm = weight_map(d)
    stored_names = {k[len(prefix) :]: k for k in wm if k.startswith(prefix)}
    if not stored_names:
        raise CheckpointError(
            f"{d} holds no {part} tensors (no names starting with {prefix!r}); "
            f"parts present: {_listing({k.split('.', 1)[0] for k in wm})}"
        )

    loaded_ids = {id(params[n]) for n in stored_names if n in params}
    missing = [n for n, p in params.items() if id(p) not in loaded_ids]
    unexpected = [n for n in stored_names if n not in params and n not in buffers]
    if missing or unexpected:
        msg = [f"{d}: the {part} tensors do not match the module built from config.json"]
        if missing:
            msg.append(f"missing {len(missing)}: {_listing(prefix + n for n in missing)}")
        if unexpected:
            msg.append(f"unexpected {len(unexpected)}: {_listing(prefix + n for n in unexpected)}")
        raise CheckpointError("; ".join(msg))

    headers = _headers(d, {full: wm[full] for full in stored_names.values()})
    bad = []
    for n, full in stored_names.items():
        ref = params[n] if n in params else buffers[n]
        if headers[full].shape != tuple(ref.shape):
            bad.append(f"{full}: checkpoint {list(headers[full].shape)} vs model {list(ref.shape)}")
    if bad:
        raise CheckpointError(f"{d}: shape mismatch for {len(bad)} tensors: " + "; ".join(bad[:10]))

    def target(ref: Tensor, stored: _Stored) -> torch.dtype:
        if not stored.dtype.is_floating_point:
            return ref.dtype if not ref.dtype.is_floating_point else stored.dtype
        if want is not None:
            return want
        return stored.dtype if ref.device.type == "meta" else ref.dtype

    from tqdm.auto import tqdm

    total = sum(h.nbytes for h in headers.values())
    by_file: dict[str, list[str]] = {}
    for n, full in stored_names.items():
        by_file.setdefault(headers[full].file, []).append(n)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {part}", disable=quiet) as bar:
        for fname in sorted(by_file):
            f = _open_mapped(d / fname)
            for n in by_file[fname]:
                full = stored_names[n]
                stored = _get(f, d / fname, full)
                if n in params:
                    ref = params[n]
                    t = stored.to(device=device, dtype=target(ref, headers[full]))
                    p = nn.Parameter(t, requires_grad=ref.requires_grad)
                    for alias in aliases[id(ref)]:  # a tied head: one parameter, as built
                        _set(module, alias, p, True)
                else:
                    t = stored.to(device=device, dtype=target(buffers[n], headers[full]))
                    _set(module, n, t, False)
                if t.data_ptr() != stored.data_ptr():  # converted or moved: drop the pages
                    f.release(full)
                bar.update(headers[full].nbytes)

    # Buffers computed at construction (not stored): move and cast like ``module.to``.
    for n, b in module.named_buffers(remove_duplicate=False):
        if n in stored_names:
            continue
        cast = want if (want is not None and b.is_floating_point()) else None
        nb = b.to(device=device, dtype=cast)
        if nb is not b:
            _set(module, n, nb, False)
    still = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    still += [n for n, b in module.named_buffers() if b.device.type == "meta"]
    if still:  # a buffer created on meta by the module itself, never stored
        raise CheckpointError(f"{part}: tensors left uninitialised by loading: {_listing(still)}")
    return module.eval()


# ---------------------------------------------------------------------------------------------
# Speakers


@dataclass(frozen=True)
class Speaker:
    """One voice from ``spk_dict.pt``."""

    name: str
    bos_token: int  # thinker-vocabulary id fed to the talker before the codec stream
    cond: Tensor  # [1, 192] x-vector
    ref_mel: Tensor  # [1, T, 80] log-mel reference


class Speakers(dict):
    """``{name: Speaker}`` with case-insensitive lookup; unknown names raise
    :class:`UnknownSpeakerError` listing the available voices."""

    def _key(self, name: str) -> str | None:
        if dict.__contains__(self, name):
            return name
        low = str(name).lower()
        return next((k for k in self if k.lower() == low), None)

    def __getitem__(self, name: str) -> Speaker:
        k = self._key(name)
        if k is None:
            raise UnknownSpeakerError(
                f"unknown voice {name!r}; available: {', '.join(sorted(self)) or '(none)'}"
            )
        return dict.__getitem__(self, k)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) is not None

    def get(self, name: str, default=None):  # type: ignore[override]
        k = self._key(name)
        return default if k is None else dict.__getitem__(self, k)


def load_speakers(model_dir: str | os.PathLike) -> Speakers:
    """The voices in ``spk_dict.pt`` (``{name: {"bos_token", "cond", "ref_mel"}}``)."""
    path = Path(model_dir) / SPEAKERS_FILE
    if not path.is_file():
        raise CheckpointError(f"{Path(model_dir)} has no {SPEAKERS_FILE} (needed for speech)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from e
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{path} does not hold a non-empty {{name: voice}} dict")
    out = Speakers()
    for name, v in raw.items():
        try:
            cond = v["cond"].float().reshape(1, -1)
            ref_mel = v["ref_mel"].float()
            if ref_mel.ndim == 2:
                ref_mel = ref_mel[None]
            out[str(name)] = Speaker(str(name), int(v["bos_token"]), cond, ref_mel)
        except (KeyError, TypeError, AttributeError, RuntimeError) as e:
            raise CheckpointError(
                f"{path}: voice {name!r} lacks bos_token/cond/ref_mel ({type(e).__name__}: {e})"
            ) from e
        if ref_mel.ndim != 3 or ref_mel.shape[-1] != 80:
            raise CheckpointError(f"{path}: voice {name!r} ref_mel has shape {list(ref_mel.shape)}")
    return out
