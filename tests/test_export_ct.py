"""Export to compressed-tensors ``pack-quantized``, checked against the libraries themselves.

Round trips decompress with compressed-tensors' own code (its ``PackedQuantizationCompressor``
and the transformers integration) and load with stock vLLM's own layers, parameters and
``AutoWeightsLoader``; the expected weights are always ``dequantize_linear`` of the source.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from leanquant.cli import main
from leanquant_serve.compressed_tensors.export import (
    ExportError,
    export_compressed_tensors,
)
from leanquant_serve.format import (
    Checkpoint,
    CheckpointWriter,
    FormatError,
    dequantize_linear,
    pack_codes,
    unpack_codes,
    unpack_linear,
)
from quantizer.gptq import GPTQSettings
from quantizer.pipeline import QuantizeJob, quantize_model

# name -> (bits, group_size, grid, actorder, static_groups, rtn, zero points forced to 2**(b-1))
KINDS = {
    "w4g32": (4, 32, "affine", True, True, False, False),  # act-order, static groups
    "w4g32-dynamic": (4, 32, "affine", True, False, False, False),  # act-order with g_idx
    "w8pc": (8, -1, "affine", False, False, True, False),  # per channel
    "w4sym": (4, 32, "affine", False, False, True, True),
    "w2sym": (2, 32, "affine", False, False, True, True),
    "w2": (2, 32, "affine", False, False, True, False),
    "w3": (3, 32, "affine", False, False, True, False),
    "w3sym": (3, 32, "affine", False, False, True, True),
    "nonuniform": (4, -1, "nonuniform", False, False, True, False),
}
EXPORTABLE = ("w4g32", "w8pc", "w4sym", "w2sym")


def _symmetric_copy(src: Path, out: Path) -> Path:
    """``src`` with every zero point set to 2**(bits-1): a symmetric checkpoint."""
    ck = Checkpoint(src)
    bits = ck.qcfg.bits
    with CheckpointWriter(out) as w:
        for name in ck.tensor_names():
            t = ck.get(name)
            if name.endswith(".zero_points"):
                z = torch.full_like(unpack_codes(t, bits, dim=1), 1 << (bits - 1))
                t = pack_codes(z, bits, dim=1)
            w.add({name: t})
        hf = {k: v for k, v in ck.hf_config.items() if k != "quantization_config"}
        w.finalize(hf, ck.qcfg, copy_from=ck.path)
    return out


@pytest.fixture(scope="module")
def checkpoint(tiny_model, calib_text, tmp_path_factory) -> Callable[[str], Path]:
    """``checkpoint(kind)``: a LeanQuant checkpoint of the tiny llama (see KINDS)."""
    cache: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in cache:
            bits, group, grid, actorder, static, rtn, sym = KINDS[kind]
            s = GPTQSettings(
                bits=bits,
                group_size=group,
                fit=grid,
                actorder=actorder,
                static_groups=static,
                blocksize=32,
            )
            out = tmp_path_factory.mktemp(kind) / "ckpt"
            calib = {} if rtn else dict(calib=str(calib_text), nsamples=8, seqlen=48)
            quantize_model(
                QuantizeJob(model=tiny_model("llama"), out=out, settings=s, rtn=rtn, **calib)
            )
            cache[kind] = _symmetric_copy(out, out.with_name("sym")) if sym else out
        return cache[kind]

    return make


def quant_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


# ----------------------------------------------------------------------------- layout + config


@pytest.mark.parametrize("kind", EXPORTABLE)
def test_config_is_what_compressed_tensors_writes(kind, checkpoint, exported):
    from compressed_tensors.quantization import QuantizationConfig

    src, qc = Checkpoint(checkpoint(kind)), quant_config(exported(kind))
    bits, group, *_ = KINDS[kind]
    parsed = QuantizationConfig.model_validate(qc)
    # Our JSON is exactly compressed-tensors' own serialisation of what it parses to.
    canonical = parsed.model_dump(exclude=["quant_method"])
    assert {k: qc[k] for k in canonical} == json.loads(json.dumps(canonical, default=str))
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    w = parsed.config_groups["group_0"].weights
    assert parsed.config_groups["group_0"].targets == ["Linear"]
    assert (w.num_bits, w.type, w.dynamic) == (bits, "int", False)
    assert w.strategy == ("channel" if group == -1 else "group")
    assert w.group_size == (None if group == -1 else group)
    assert w.symmetric == kind.endswith("sym")
    assert w.actorder == ("weight" if src.qcfg.desc_act else None)
    assert parsed.ignore == ["lm_head"]
    # Everything but quantization_config is the source's config.
    ct_cfg = json.loads((exported(kind) / "config.json").read_text())
    ct_cfg.pop("quantization_config")
    assert ct_cfg == {k: v for k, v in src.hf_config.items() if k != "quantization_config"}


@pytest.mark.parametrize("kind", EXPORTABLE)
def test_tensors_are_compressed_tensors_packing_of_the_codes(kind, checkpoint, exported):
    """weight_packed / weight_zero_point are bit for bit what compressed-tensors'
    pack_to_int32 makes of the codes; scales transposed, fp16; other tensors as stored."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    src, out = Checkpoint(checkpoint(kind)), load_file(exported(kind) / "model.safetensors")
    bits, mid = src.qcfg.bits, 1 << (src.qcfg.bits - 1)
    prefixes = src.quantized_prefixes()
    expected_names = set()
    for p in prefixes:
        t = src.linear_tensors(p)
        u = unpack_linear(src.qcfg, t)
        codes = u["codes"]
        signed = (codes - mid).to(torch.int8)  # compressed-tensors' quantized values
        assert torch.equal(out[f"{p}.weight_packed"], pack_to_int32(signed, bits))
        assert out[f"{p}.weight_scale"].dtype == torch.float16
        assert torch.equal(out[f"{p}.weight_scale"], t["scales"].t())
        assert out[f"{p}.weight_shape"].dtype == torch.int64
        assert out[f"{p}.weight_shape"].tolist() == list(codes.shape)
        names = {f"{p}.weight_packed", f"{p}.weight_scale", f"{p}.weight_shape"}
        if not kind.endswith("sym"):
            zp = (u["zeros"].t() - mid).to(torch.int8)  # (out, G)
            assert torch.equal(out[f"{p}.weight_zero_point"], pack_to_int32(zp, bits, packed_dim=0))
            names.add(f"{p}.weight_zero_point")
        expected_names |= names
    stored = {f"{p}.{s}" for p in prefixes for s in ("qweight", "scales", "zero_points")}
    for name in set(src.tensor_names()) - stored:
        expected_names.add(name)
        assert out[name].dtype == src.get(name).dtype and torch.equal(out[name], src.get(name))
    assert set(out) == expected_names
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (exported(kind) / f).read_bytes() == (src.path / f).read_bytes()


@pytest.mark.parametrize("kind", EXPORTABLE)
def test_compressed_tensors_decompresses_to_the_reference(kind, checkpoint, exported):
    """compressed-tensors' PackedQuantizationCompressor (picked by the config's format) turns
    every exported layer back into exactly dequantize_linear of the source: in fp32, and in
    fp16 with the stored fp16 scales."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    src, out = Checkpoint(checkpoint(kind)), load_file(exported(kind) / "model.safetensors")
    qc = QuantizationConfig.model_validate(quant_config(exported(kind)))
    scheme = qc.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    assert compressor.__name__ == "PackedQuantizationCompressor"
    for p in src.quantized_prefixes():
        names = compressor.compression_param_names(scheme)
        local = {n: out[f"{p}.{n}"] for n in names}
        assert set(names) == {n.rpartition(".")[2] for n in out if n.startswith(p + ".")}
        tensors = src.linear_tensors(p)
        for dtype in (torch.float32, torch.float16):
            sd = {**local, "weight_scale": local["weight_scale"].to(dtype)}
            w = compressor.decompress(sd, scheme)["weight"]
            assert w.dtype == dtype
            assert torch.equal(w, dequantize_linear(src.qcfg, tensors, dtype)), (p, dtype)


def test_transformers_loads_the_export_through_compressed_tensors(checkpoint, exported):
    """The whole folder through transformers' compressed-tensors integration (config parse,
    targets and ignore, load, decompress): every tensor equals the source's."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src = Checkpoint(checkpoint("w4g32"))
    model = AutoModelForCausalLM.from_pretrained(
        exported("w4g32"),
        dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(dequantize=True),
    )
    quantized = {n for n, m in model.named_modules() if hasattr(m, "quantization_scheme")}
    assert quantized == set(src.quantized_prefixes())
    state = model.state_dict()
    for name, t in src.state_dict(torch.float32).items():
        assert torch.equal(state[name], t), name


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("nonuniform", "grid 'nonuniform' stores a lookup table per row"),
        ("w3", "3-bit: compressed-tensors 0.17.0 packs 10 codes per int32"),
        ("w3sym", "vLLM sizes weight_packed for dense 3-bit packing"),
        ("w2", "asymmetric 2-bit weights (zero points other than 2) have no stock vLLM kernel"),
        ("w4g32-dynamic", "act-order with dynamic groups (g_idx) cannot be exported"),
    ],
)
def test_unexportable_checkpoints_are_refused(kind, reason, checkpoint, tmp_path, capsys):
    with pytest.raises(ExportError, match=reason.replace("(", r"\(").replace(")", r"\)")) as e:
        export_compressed_tensors(checkpoint(kind), tmp_path / "ct")
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
    code = main(["export", "compressed-tensors", str(checkpoint(kind)), str(tmp_path / "ct")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("leanquant: error:")]
    assert code == 2 and len(lines) == 1 and reason in lines[0] and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "skip, error",
    [
        (r"mlp\.down_proj", None),
        (r"self_attn\.k_proj", "q_proj, k_proj, v_proj are quantized only in part"),
    ],
)
def test_unquantized_linears_are_ignored_unless_vllm_fuses_them(skip, error, tiny_model, tmp_path):
    s = GPTQSettings(bits=4, group_size=32, fit="minmax", actorder=False, static_groups=False)
    src = tmp_path / "ckpt"
    quantize_model(
        QuantizeJob(model=tiny_model("llama"), out=src, settings=s, rtn=True, skip=(skip,))
    )
    if error:
        with pytest.raises(ExportError, match=error):
            export_compressed_tensors(src, tmp_path / "ct")
        assert not (tmp_path / "ct").exists()
        return
    export_compressed_tensors(src, tmp_path / "ct")
    ignore = quant_config(tmp_path / "ct")["ignore"]
    assert ignore == [f"model.layers.{i}.mlp.down_proj" for i in range(2)] + ["lm_head"]


def test_failure_midway_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    from leanquant_serve.compressed_tensors import export as ct

    real, calls = ct._convert_linear, []

    def fail_on_third(*args):
        calls.append(args[1])
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(*args)

    monkeypatch.setattr(ct, "_convert_linear", fail_on_third)
    with pytest.raises(RuntimeError, match="disk full"):
        export_compressed_tensors(checkpoint("w4sym"), tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite_and_never_the_source(checkpoint, tmp_path, capsys):
    src, out = checkpoint("w4sym"), tmp_path / "ct"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(FormatError, match="already exists"):
        export_compressed_tensors(src, out)
    code = main(["export", "compressed-tensors", str(src), str(out)])
    assert code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert main(["export", "compressed-tensors", str(src), str(out), "--overwrite"]) == 0
    assert "W4A16, symmetric, group size 32" in capsys.readouterr().out
    assert not (out / "stale.txt").exists() and quant_config(out)["format"] == "pack-quantized"
    with pytest.raises(ExportError, match="is the source checkpoint"):
        export_compressed_tensors(src, src, overwrite=True)
    assert Checkpoint(src).quantized_prefixes()
    code = main(["export", "compressed-tensors", str(tmp_path / "nowhere"), str(tmp_path / "x")])
    assert code == 2 and "not a checkpoint folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- stock vLLM

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 4, 2, 16  # conftest's tiny llama
LAYER = "model.layers.0"


@pytest.fixture(scope="module")
def vllm_env():
    pytest.importorskip("vllm")  # guard for machines without vLLM; here and in CI it runs
    import vllm.model_executor.layers.linear as L
    import vllm.model_executor.parameter as P
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
        compressed_tensors_wNa16 as wna16,
    )

    torch.set_num_threads(1)  # importing vLLM may change it
    return L, P, wna16


class _NoKernel:
    """Stands in for the kernel on CPUs without one for this weight type: only the choice of
    kernel is replaced; parameters and weight loaders are vLLM's."""

    def __init__(self, *args, **kwargs) -> None:
        pass


def vllm_layers(vllm_env, qc: dict, rank: int, size: int) -> nn.Module:
    """Layer 0 of the tiny llama as vLLM builds it at TP rank/size, weights loaded from the
    export with vLLM's AutoWeightsLoader and Llama's checkpoint-name mapper (q/k/v -> qkv_proj,
    gate/up -> gate_up_proj), before process_weights_after_loading."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.linear import (
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )
    from vllm.model_executor.models.llama import LlamaForCausalLM

    L, P, wna16 = vllm_env
    cfg = CompressedTensorsConfig.from_config(json.loads(json.dumps(qc)))
    cfg.packed_modules_mapping = dict(LlamaForCausalLM.packed_modules_mapping)
    w = cfg.target_scheme_map["Linear"]["weights"]
    kw = dict(bias=False, quant_config=cfg, params_dtype=torch.float16)
    with (
        set_current_vllm_config(VllmConfig()),
        mock.patch.object(L, "get_tensor_model_parallel_rank", lambda: rank),
        mock.patch.object(L, "get_tensor_model_parallel_world_size", lambda: size),
        mock.patch.object(P, "get_tensor_model_parallel_rank", lambda: rank),
        mock.patch.object(P, "get_tensor_model_parallel_world_size", lambda: size),
        # This CPU's only kernel (CPUWNA16) takes 4-bit; other widths get a stand-in.
        mock.patch.object(
            wna16,
            "choose_mp_linear_kernel",
            wna16.choose_mp_linear_kernel if w.num_bits == 4 else lambda c: _NoKernel,
        ),
    ):
        attn, mlp = nn.Module(), nn.Module()
        attn.qkv_proj = QKVParallelLinear(
            HIDDEN, HEAD_DIM, HEADS, KV_HEADS, prefix=f"{LAYER}.self_attn.qkv_proj", **kw
        )
        attn.o_proj = RowParallelLinear(HIDDEN, HIDDEN, prefix=f"{LAYER}.self_attn.o_proj", **kw)
        mlp.gate_up_proj = MergedColumnParallelLinear(
            HIDDEN, [INTER, INTER], prefix=f"{LAYER}.mlp.gate_up_proj", **kw
        )
        mlp.down_proj = RowParallelLinear(INTER, HIDDEN, prefix=f"{LAYER}.mlp.down_proj", **kw)
    layer = nn.Module()
    layer.self_attn, layer.mlp = attn, mlp
    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList([layer])
    root.quant_config = cfg
    return root


def load_with_vllm(root: nn.Module, export: Path) -> set[str]:
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.utils import AutoWeightsLoader

    sd = load_file(export / "model.safetensors")
    weights = [(n, t) for n, t in sd.items() if n.startswith(f"{LAYER}.") and "proj" in n]
    loader = AutoWeightsLoader(root)
    return loader.load_weights(weights, mapper=LlamaForCausalLM.hf_to_vllm_mapper)


def vllm_dequantize(layer: nn.Module) -> torch.Tensor:
    """(out, in) of this rank from the loaded parameters, with vLLM's own unpacking helper
    and the scheme's scalar type (its bias is the implied zero point of symmetric types)."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        unpack_quantized_values_into_int32,
    )
    from vllm.scalar_type import scalar_types

    scheme = layer.scheme
    wtype = getattr(scalar_types, f"uint{scheme.num_bits}")  # the codes, without bias
    q = unpack_quantized_values_into_int32(layer.weight_packed.data, wtype, packed_dim=1)
    s = layer.weight_scale.data.float()
    if scheme.symmetric:
        z = torch.full(s.shape, scheme.quant_type.bias, dtype=torch.int32)
    else:
        z = unpack_quantized_values_into_int32(layer.weight_zero_point.data, wtype, packed_dim=0)
    assert q.shape == (layer.output_size_per_partition, layer.input_size_per_partition)
    assert z.shape == s.shape
    g = torch.arange(q.shape[1]) // (q.shape[1] // s.shape[1])
    return (q - z[:, g]).float() * s[:, g]


@pytest.mark.parametrize("kind", EXPORTABLE)
@pytest.mark.parametrize("tp", [1, 2])
def test_stock_vllm_loads_the_reference_weights(kind, tp, vllm_env, checkpoint, exported):
    src, export = Checkpoint(checkpoint(kind)), exported(kind)
    ref = {p: src.dequantized_weight(p) for p in src.quantized_prefixes() if p.startswith(LAYER)}
    fused = {
        "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.o_proj": ("self_attn.o_proj",),
        "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.down_proj": ("mlp.down_proj",),
    }
    shards: dict[str, list[torch.Tensor]] = {}  # source linear -> this shard of every rank
    for rank in range(tp):
        root = vllm_layers(vllm_env, quant_config(export), rank, tp)
        loaded = load_with_vllm(root, export)
        assert loaded == {n for n, _ in root.named_parameters()}  # every parameter, once
        for vname, parts in fused.items():
            layer = root.get_submodule(f"{LAYER}.{vname}")
            assert type(layer.scheme).__name__ == "CompressedTensorsWNA16"
            W = vllm_dequantize(layer)
            row_parallel = len(parts) == 1 and vname.endswith(("o_proj", "down_proj"))
            if row_parallel:
                full = ref[f"{LAYER}.{parts[0]}"]
                assert torch.equal(W, full.chunk(tp, dim=1)[rank])
                assert layer.weight_shape.tolist() == list(full.shape)
                shards.setdefault(parts[0], []).append(W)
                continue
            for part, Wp in zip(parts, W.split(layer.output_partition_sizes), strict=True):
                assert torch.equal(Wp, ref[f"{LAYER}.{part}"].chunk(tp)[rank]), (part, rank)
                shards.setdefault(part, []).append(Wp)
    for part, pieces in shards.items():
        dim = 1 if part.endswith(("o_proj", "down_proj")) else 0
        assert torch.equal(torch.cat(pieces, dim=dim), ref[f"{LAYER}.{part}"]), part
    assert len(shards) == 7


def test_vllm_ignores_the_unquantized_linears(vllm_env, exported):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    cfg = CompressedTensorsConfig.from_config(quant_config(exported("w4g32")))
    assert cfg.get_scheme_dict(nn.Linear(1, 1), "lm_head") is None
    assert cfg.get_scheme_dict(nn.Linear(1, 1), f"{LAYER}.mlp.down_proj") is not None


def test_why_dynamic_act_order_and_3_bit_are_refused(vllm_env, exported):
    """The facts behind two refusals: vLLM rejects actorder 'group' (the only way to store
    g_idx), and sizes 3-bit weight_packed for dense packing while compressed-tensors 0.17
    packs 10 codes per word."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    qc = quant_config(exported("w4g32"))
    qc["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    with pytest.raises(ValueError, match="actorder='group'.*no longer supported"):
        CompressedTensorsConfig.from_config(qc)

    qc = quant_config(exported("w4sym"))
    qc["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    root = vllm_layers(vllm_env, qc, 0, 1)
    vllm_words = root.get_submodule(f"{LAYER}.self_attn.o_proj").weight_packed.shape[1]
    ct_words = pack_to_int32(torch.zeros(HIDDEN, HIDDEN, dtype=torch.int8), 3).shape[1]
    assert (vllm_words, ct_words) == (HIDDEN * 3 // 32, -(-HIDDEN // 10)) == (6, 7)
