"""Writing and reading LeanQuant checkpoint folders with a tiny random Llama."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from leanquant_serve.format import (
    Checkpoint,
    CheckpointWriter,
    FormatError,
    LeanQuantConfig,
    dequantize_linear,
    load_reference_model,
    pack_linear,
)

CONFIGS = {
    "affine_g_idx_4bit": LeanQuantConfig(bits=4, group_size=32, desc_act=True),
    "affine_channel_3bit": LeanQuantConfig(bits=3, quantizer={"method": "test"}),
    "nonuniform_3bit": LeanQuantConfig(bits=3, grid="nonuniform"),
}
SMALL_SHARDS = 16 * 1024
Q_PROJ = "model.layers.0.self_attn.q_proj"


def tiny_model(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def random_linear(cfg: LeanQuantConfig, out_f: int, in_f: int, g: torch.Generator) -> dict:
    levels = 1 << cfg.bits
    args = {"codes": torch.randint(0, levels, (out_f, in_f), generator=g)}
    if cfg.grid == "nonuniform":
        args["lut"] = torch.randn(out_f, levels, generator=g) * 0.05
        return args
    n_groups = cfg.n_groups(in_f)
    args["scales"] = torch.rand(n_groups, out_f, generator=g) * 0.01 + 0.001
    args["zeros"] = torch.randint(0, levels, (n_groups, out_f), generator=g)
    if cfg.uses_g_idx:
        args["g_idx"] = torch.randperm(in_f, generator=g) // cfg.group_size
    return args


def quantize_randomly(model: nn.Module, cfg: LeanQuantConfig):
    """(dense tensors to store, prefix -> packed linear) with random codes for every linear."""
    g = torch.Generator().manual_seed(0)
    packed = {
        name: pack_linear(cfg, **random_linear(cfg, m.out_features, m.in_features, g))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not cfg.is_skipped(name)
    }
    dense = {
        k: v
        for k, v in model.state_dict().items()
        if k.removesuffix(".weight") not in packed
        and not (model.config.tie_word_embeddings and k == "lm_head.weight")
    }
    return dense, packed


def write(out: Path, model, cfg, max_shard_bytes=SMALL_SHARDS, copy_from=None, **kw) -> dict:
    dense, packed = quantize_randomly(model, cfg)
    with CheckpointWriter(out, max_shard_bytes=max_shard_bytes, **kw) as writer:
        writer.add(dense)
        for prefix, tensors in packed.items():
            writer.add({f"{prefix}.{s}": t for s, t in tensors.items()})
        writer.finalize(model.config.to_dict(), cfg, copy_from=copy_from)
    return packed


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_round_trip(tmp_path, cfg):
    model = tiny_model()
    out = tmp_path / "ckpt"
    packed = write(out, model, cfg)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    stored = {k: v for s in shards for k, v in load_file(out / s).items()}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in stored.values())
    assert index["weight_map"].keys() == stored.keys()

    ckpt = Checkpoint(out)
    ckpt.validate()
    assert ckpt.qcfg == cfg
    assert ckpt.hf_config["quantization_config"] == cfg.to_dict()
    assert ckpt.hf_config["hidden_size"] == 64
    assert ckpt.quantized_prefixes() == sorted(packed)
    assert len(packed) == 14  # 7 linears per layer, lm_head left alone

    state = ckpt.state_dict()
    expected = dict(model.state_dict())
    expected.update({f"{p}.weight": dequantize_linear(cfg, t) for p, t in packed.items()})
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    assert torch.equal(ckpt.dequantized_weight(Q_PROJ), expected[f"{Q_PROJ}.weight"])
    half = ckpt.state_dict(torch.float16)
    assert all(t.dtype == torch.float16 for t in half.values())


def test_single_shard_has_no_index(tmp_path):
    out = tmp_path / "ckpt"
    write(out, tiny_model(), CONFIGS["affine_channel_3bit"], max_shard_bytes=2**30)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    Checkpoint(out).validate()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_reference_model_matches_manual_substitution(tmp_path, cfg, tie):
    model = tiny_model(tie)
    packed = write(tmp_path / "ckpt", model, cfg)
    ref = load_reference_model(tmp_path / "ckpt")
    # Independent expectation: the original model with its linears' weights swapped by hand.
    with torch.no_grad():
        for prefix, tensors in packed.items():
            model.get_submodule(prefix).weight.copy_(dequantize_linear(cfg, tensors))
        ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
        logits = ref(ids).logits
        assert logits.shape == (2, 9, 128) and torch.isfinite(logits).all()
        torch.testing.assert_close(logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    if tie:
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()


def test_folder_appears_only_at_finalize(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("tokenizer.json", "generation_config.json", "notes.txt"):
        (source / name).write_text("{}")
    model, cfg = tiny_model(), CONFIGS["affine_g_idx_4bit"]
    dense, packed = quantize_randomly(model, cfg)
    out = tmp_path / "ckpt"
    with CheckpointWriter(out, max_shard_bytes=SMALL_SHARDS) as writer:
        writer.add(dense)
        for prefix, tensors in packed.items():
            writer.add({f"{prefix}.{s}": t for s, t in tensors.items()})
        assert not out.exists()
        partial = tmp_path / ".ckpt.partial"
        assert any(partial.glob("*.safetensors"))  # shards were flushed while adding
        writer.finalize(model.config.to_dict(), cfg, copy_from=source)
    assert not partial.exists()
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    assert not (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "source"]
    with pytest.raises(RuntimeError, match="already finalized"):
        writer.add({"x": torch.zeros(1)})


def test_exception_in_with_block_leaves_nothing(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(KeyError), CheckpointWriter(out, max_shard_bytes=16) as writer:
        writer.add({"a": torch.zeros(8), "b": torch.ones(8)})
        raise KeyError("quantization failed")
    assert list(tmp_path.iterdir()) == []
    with CheckpointWriter(out) as writer:  # leaving without finalize() discards too
        writer.add({"a": torch.zeros(8)})
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_needs_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FormatError, match="already exists"):
        CheckpointWriter(out)
    model, cfg = tiny_model(), CONFIGS["nonuniform_3bit"]
    with CheckpointWriter(out, overwrite=True) as writer:
        writer.add(model.state_dict())
        assert (out / "old.txt").exists()  # replaced only at the very end
        writer.finalize(model.config.to_dict(), cfg)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_finalize_rejects_unserialisable_config(tmp_path):
    with CheckpointWriter(tmp_path / "ckpt") as writer:
        writer.add({"a": torch.zeros(8)})
        with pytest.raises(FormatError, match="^hf_config: not JSON"):
            writer.finalize({"dtype": torch.float16}, LeanQuantConfig(bits=4))
    assert list(tmp_path.iterdir()) == []


def test_duplicate_tensor_name(tmp_path):
    with CheckpointWriter(tmp_path / "ckpt", max_shard_bytes=16) as writer:
        writer.add({"a": torch.zeros(8)})
        with pytest.raises(FormatError, match="^a: duplicate"):
            writer.add({"b": torch.zeros(8), "a": torch.zeros(8)})
        writer.add({"b": torch.zeros(8)})  # the rejected call added nothing


def test_added_tensors_are_snapshots(tmp_path):
    t = torch.zeros(4, 8)
    with CheckpointWriter(tmp_path / "ckpt") as writer:
        writer.add({"t": t.t()})  # non-contiguous view
        t += 1
        writer.finalize({"model_type": "llama"}, LeanQuantConfig(bits=4))
    assert torch.equal(load_file(tmp_path / "ckpt" / "model.safetensors")["t"], torch.zeros(8, 4))


# ---------------------------------------------------------------- corrupted checkpoints


def edit_single_file(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def single_file_ckpt(tmp_path) -> Path:
    write(tmp_path / "ckpt", tiny_model(), CONFIGS["affine_g_idx_4bit"], max_shard_bytes=2**30)
    return tmp_path / "ckpt"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.pop(f"{Q_PROJ}.scales"), rf"^{Q_PROJ}\.scales: missing"),
        (lambda t: t.pop(f"{Q_PROJ}.qweight"), rf"^{Q_PROJ}\.qweight: missing"),
        (
            lambda t: t.update({f"{Q_PROJ}.qweight": t[f"{Q_PROJ}.qweight"][:, :-8].clone()}),
            rf"^{Q_PROJ}\.\w+: shape .* for {Q_PROJ}\.qweight of shape \(8, 56\)",
        ),
        (
            lambda t: t.update({f"{Q_PROJ}.qweight": t[f"{Q_PROJ}.qweight"][:-1].clone()}),
            rf"^{Q_PROJ}\.qweight: in_features=56 is not a multiple of group_size=32",
        ),
        (
            lambda t: t.update({f"{Q_PROJ}.qweight": t[f"{Q_PROJ}.qweight"].long()}),
            rf"^{Q_PROJ}\.qweight: dtype torch.int64",
        ),
        (
            lambda t: t.update({f"{Q_PROJ}.lut": torch.zeros(64, 16, dtype=torch.float16)}),
            rf"^{Q_PROJ}\.lut: unexpected",
        ),
        (lambda t: t.update({f"{Q_PROJ}.weight": torch.zeros(64, 64)}), rf"^{Q_PROJ}\.weight: "),
        (lambda t: t.update({"lm_head.qweight": t.pop("lm_head.weight")}), "^lm_head.qweight: "),
    ],
    ids=[
        "missing_scales",
        "missing_qweight",
        "qweight_columns",
        "qweight_rows",
        "qweight_dtype",
        "stray_lut",
        "dense_and_quantized",
        "skipped_module_quantized",
    ],
)
def test_corrupted_tensors_are_named(single_file_ckpt, edit, match):
    edit_single_file(single_file_ckpt, edit)
    ckpt = Checkpoint(single_file_ckpt)
    with pytest.raises(FormatError, match=match):
        ckpt.validate()


def test_bad_quantization_config(single_file_ckpt):
    config_path = single_file_ckpt / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["bits"] = 5
    config_path.write_text(json.dumps(config))
    with pytest.raises(FormatError, match=r"quantization_config\.bits: 5 is not one of"):
        Checkpoint(single_file_ckpt)
    del config["quantization_config"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(FormatError, match="no quantization_config"):
        Checkpoint(single_file_ckpt)
    config_path.unlink()
    with pytest.raises(FormatError, match="config.json: missing"):
        Checkpoint(single_file_ckpt)
    with pytest.raises(FormatError, match="not a checkpoint folder"):
        Checkpoint(single_file_ckpt / "nope")


def test_index_inconsistent_with_shards(tmp_path):
    out = tmp_path / "ckpt"
    write(out, tiny_model(), CONFIGS["affine_channel_3bit"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    name = f"{Q_PROJ}.scales"
    shard = out / index["weight_map"][name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    ckpt = Checkpoint(out)
    with pytest.raises(FormatError, match=rf"^{name}: listed under {shard.name}"):
        ckpt.validate()
    with pytest.raises(FormatError, match=rf"^{name}: cannot read"):
        ckpt.get(name)
    with pytest.raises(FormatError, match="^no.such: no such tensor"):
        ckpt.get("no.such")


def test_reference_model_rejects_wrong_shape(single_file_ckpt):
    # A self-consistent linear of the wrong size passes validate(); the model shape catches it.
    cfg = CONFIGS["affine_g_idx_4bit"]
    g = torch.Generator().manual_seed(0)
    small = pack_linear(cfg, **random_linear(cfg, 64, 32, g))
    edit_single_file(
        single_file_ckpt, lambda t: t.update({f"{Q_PROJ}.{s}": v for s, v in small.items()})
    )
    Checkpoint(single_file_ckpt).validate()
    with pytest.raises(
        FormatError, match=rf"^{Q_PROJ}\.weight: shape \(64, 32\) in the checkpoint"
    ):
        load_reference_model(single_file_ckpt)
