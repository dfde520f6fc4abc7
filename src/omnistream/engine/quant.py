"""int8 (and, on CPU, int4) weight-only quantization of the decoders (gpt-fast style module swap).

Decode on one stream is memory-bound: every step reads every decoder weight once. Storing the
``nn.Linear`` weights of the Thinker / Talker decoders as int8 with one float scale per output
channel cuts those bytes 4x (fp32) or 2x (bf16); activations stay in the model dtype.

Two ways in:

* after load:  ``quantize_int8_(thinker)`` swaps each selected ``nn.Linear`` in place for an
  ``Int8Linear`` holding the quantized weight (the float weight is dropped);
* before load (no float copy ever materialised): ``sd = int8_state_dict(float_state_dict, names)``
  once (save it), then at load time ``swap_int8_(model_on_meta, names)`` and
  ``model.load_state_dict(sd, assign=True)``.

The matmul is ``torch._weight_int8pack_mm`` (CPU kernel: int8 weight [N, K], per-row scales)
where the device / dtype supports it, else ``F.linear(x, w.to(x.dtype)) * scale``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# By default: every Linear of the decoder blocks and the output heads. The Thinker's audio/vision
# encoders and the Talker's thinker_to_talker_proj (run once per position, not per weight read) stay
# in float.
DEFAULT_HEADS = ("lm_head", "codec_head")


def default_filter(name: str, module: nn.Module) -> bool:
    """True for the Linears a decode step reads: ``*layers.N.*`` of a decoder and the heads."""
    if not isinstance(module, nn.Linear):
        return False
    if (
        name.startswith(("audio_tower.", "visual."))
        or ".audio_tower." in name
        or ".visual." in name
    ):
        return False
    return ".layers." in f".{name}" or name.split(".")[-1] in DEFAULT_HEADS


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: ``w [N, K] ~= q [N, K] * scale [N, 1]``."""
    wf = w.detach().float()
    scale = wf.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [N]
    scale = scale.to(w.dtype).float()  # quantize against the scale as it will be stored
    q = torch.round(wf / scale[:, None]).clamp(-128, 127).to(torch.int8).contiguous()
    return q, scale


_PACK_OK: dict[tuple[str, torch.dtype], bool] = {}


def _int8pack_ok(x: Tensor, w: Tensor, s: Tensor) -> bool:
    """Whether ``_weight_int8pack_mm`` runs for this device/dtype (probed once, then cached)."""
    key = (x.device.type, x.dtype)
    ok = _PACK_OK.get(key)
    if ok is None:
        ok = False
        if hasattr(torch, "_weight_int8pack_mm") and x.dtype in (
            torch.float32,
            torch.bfloat16,
            torch.float16,
        ):
            try:
                torch._weight_int8pack_mm(x.reshape(-1, w.shape[1])[:1], w, s)
                ok = True
            except (RuntimeError, NotImplementedError):
                ok = False
        _PACK_OK[key] = ok
    return ok


class Int8Linear(nn.Module):
    """A drop-in ``nn.Linear`` with an int8 weight [out, in] and float scales [out].

    ``weight`` and ``scales`` are buffers (not parameters): the module is inference-only.
    On CPU, float32 inputs go through the kernel as bfloat16 (``cpu_bf16_activations``): torch's
    ``_weight_int8pack_mm`` CPU kernel is vectorised for bf16/fp16 inputs and ~8x slower for fp32
    (measured on AVX-512, torch 2.13). The output is cast back to the input dtype."""

    cpu_bf16_activations: bool = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        )

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        w = lin.weight
        m = cls(
            lin.in_features, lin.out_features, lin.bias is not None, device=w.device, dtype=w.dtype
        )
        q, s = quantize_weight(w)
        m.weight = q
        m.scales = s.to(w.dtype)
        if lin.bias is not None:
            m.bias = nn.Parameter(lin.bias.detach(), requires_grad=False)
        return m

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        kx = x
        if x.device.type == "cpu" and x.dtype == torch.float32 and self.cpu_bf16_activations:
            kx = x.to(torch.bfloat16)  # the CPU kernel is vectorised for bf16 inputs only (~8x)
        s = self.scales if self.scales.dtype == kx.dtype else self.scales.to(kx.dtype)
        if _int8pack_ok(kx, self.weight, s):
            y = torch._weight_int8pack_mm(kx.reshape(-1, self.in_features), self.weight, s)
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            s = self.scales.to(x.dtype)
            y = F.linear(x, self.weight.to(x.dtype)) * s
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


# ---------------------------------------------------------------------------------------------
# int4 (CPU): group-wise asymmetric 4-bit weights, torch's ``_weight_int4pack_mm_for_cpu``

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the kernel accepts


def quantize_weight_int4(w: Tensor, group_size: int = 128) -> tuple[Tensor, Tensor]:
    """``w [N, K]`` -> (q int32 [N, K] in 0..15, scales_and_zeros [K / G, N, 2] bf16) with
    ``w ~= (q - 8) * scale + zero`` per group of ``G`` input columns (min/max affine)."""
    N, K = w.shape
    wg = w.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = lo + 8 * scale
    scale, zero = scale.bfloat16().float(), zero.bfloat16().float()  # as the kernel reads them
    q = torch.round((wg - zero) / scale + 8).clamp(0, 15).to(torch.int32).reshape(N, K)
    sz = torch.stack([scale[..., 0], zero[..., 0]], dim=-1)  # [N, K / G, 2]
    return q, sz.transpose(0, 1).contiguous().bfloat16()


def int4_ok(lin: nn.Linear, group_size: int) -> bool:
    """Shapes the CPU kernel takes: N % 16 == 0, K % group_size == 0."""
    N, K = lin.weight.shape
    return (lin.weight.device.type == "cpu" and group_size in INT4_GROUP_SIZES
            and N % 16 == 0 and K % group_size == 0)


class Int4Linear(nn.Module):
    """A drop-in ``nn.Linear`` (CPU, inference) with 4-bit weights packed for torch's kernel:
    half a byte per weight + a bf16 (scale, zero) pair per ``group_size`` inputs. Activations go
    through the kernel as bf16; the output is cast back to the input dtype."""

    def __init__(self, lin: nn.Linear, group_size: int = 128):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.group_size = group_size
        q, sz = quantize_weight_int4(lin.weight, group_size)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
        self.register_buffer("scales_and_zeros", sz)
        self.bias = None
        if lin.bias is not None:
            self.bias = nn.Parameter(lin.bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).to(torch.bfloat16), self.weight, self.group_size,
            self.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}")


Filter = Callable[[str, nn.Module], bool]


def _selected(model: nn.Module, filter_fn: Filter) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if filter_fn(n, m)]


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def quantize_int8_(model: nn.Module, filter_fn: Filter = default_filter) -> list[str]:
    """Swap the selected ``nn.Linear`` modules of a loaded model for ``Int8Linear`` in place.

    Returns the swapped module names. Tied weights are not supported (the release has none)."""
    names = []
    for name, lin in _selected(model, filter_fn):
        _set(model, name, Int8Linear.from_linear(lin))
        names.append(name)
    return names


@torch.no_grad()
def quantize_int4_(model: nn.Module, group_size: int = 128,
                   filter_fn: Filter = default_filter) -> list[str]:
    """Swap the selected ``nn.Linear`` modules for ``Int4Linear`` (CPU) in place; Linears whose
    shape the kernel cannot take (see ``int4_ok``) are left in float. Returns the swapped names."""
    names = []
    for name, lin in _selected(model, filter_fn):
        if int4_ok(lin, group_size):
            _set(model, name, Int4Linear(lin, group_size))
            names.append(name)
    return names


def swap_int8_(
    model: nn.Module, names: Iterable[str] | None = None, filter_fn: Filter = default_filter
) -> list[str]:
    """Before load: replace the Linears (by ``names``, or ``filter_fn``) with empty ``Int8Linear``
    modules (on the Linear's device, e.g. ``meta``), ready for
    ``load_state_dict(int8_sd, assign=True)``."""
    mods = dict(model.named_modules())
    sel = list(names) if names is not None else [n for n, _ in _selected(model, filter_fn)]
    for name in sel:
        lin = mods[name]
        w = lin.weight
        _set(
            model,
            name,
            Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, w.device, w.dtype),
        )
    return sel


@torch.no_grad()
def int8_state_dict(sd: dict[str, Tensor], names: Iterable[str]) -> dict[str, Tensor]:
    """A float state dict with ``{name}.weight`` of each listed Linear replaced by the int8 weight
    and a ``{name}.scales`` entry (in the weight's dtype)."""
    out = dict(sd)
    for name in names:
        w = out[f"{name}.weight"]
        q, s = quantize_weight(w)
        out[f"{name}.weight"] = q
        out[f"{name}.scales"] = s.to(w.dtype)
    return out


def weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers (int8 weights count 1 byte each)."""
    seen, n = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen and t.device.type != "meta":
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n
