"""W8A8 int8 exports (compressed-tensors) served by vLLM's CPU backend vs the unquantized model.

One small BLOOM (hidden 256, 8 heads => head size 32, which vLLM's CPU attention accepts;
2 layers), random weights scaled so every prompt gets its own continuation, with some heads and
MLP neurons zeroed as structured pruning leaves them. It is exported plain, compacted and
sparse-packed (as ``bloomray export`` writes pruned models), each quantized with
``quantize_w8a8``. vLLM serves the plain bf16 export, its W8A8 copy and the compacted W8A8 copy
(through bloomray's vLLM plugin), one engine at a time, each shut down before the next starts.

Without vLLM the file checks that the written int8 weights times their scales are within one
quantization step of the originals, the config vLLM reads, what compacted/sparse copies keep,
and the errors.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BloomConfig

from bloomray.data.corpus import embedded_documents
from bloomray.data.tokenizer import train_tokenizer
from bloomray.export.consolidate import write_model
from bloomray.export.load import load_model
from bloomray.export.sparse import SPARSE_KEY
from bloomray.model.build import build_from_config
from bloomray.model.compact import SPEC_KEY
from bloomray.serving.quantize import QUANT_TARGETS, QuantizeError, cpu_int8_caveat, quantize_w8a8

pytestmark = pytest.mark.integration

HIDDEN, N_LAYER, N_HEAD = 256, 2, 8  # head size 32: vLLM's CPU attention supports it
# Structured pruning the model went through (zeros): different head counts per layer, not
# prefixes, so the compacted export is padded and reindexed by bloomray's vLLM plugin.
KEPT_HEADS = [[0, 2, 3, 5, 6, 7], [1, 4, 6]]
KEPT_NEURONS = [[n for n in range(4 * HIDDEN) if n % 4], list(range(100, 4 * HIDDEN))]
N_PROMPTS, NEW_TOKENS = 16, 16
# Random weights, shaped so greedy continuations differ per prompt and vary along the way:
# block Linears ~ N(0, 0.06^2), embeddings (tied with the LM head) ~ N(0, 0.15^2), so logits
# have std ~2.4, and a final LayerNorm gain ~ N(0, 1): with the stock gain of 1 the residual
# stream keeps the last token's own embedding, and the tied LM head then repeats that token
# forever. Larger block scales make a random model chaotic (many near-tied greedy choices that
# any rounding flips, bf16 vs fp32 included).
WEIGHT_STD, EMBED_STD, BIAS_STD = 0.06, 0.15, 0.05
# Thresholds. Measured (vLLM 0.29 CPU with bloomray's vLLM plugin), W8A8 vs bf16, both served
# by vLLM; in brackets the same measure for bf16 vLLM vs fp32 transformers, i.e. what bf16
# rounding alone does to this model. Two CPUs, two int8 GEMMs:
#                                      AVX-512+VNNI    AVX2, no VNNI (Zen 3)
#   first generated token equal           16/16           15/16         [16/16]
#   all 16 greedy tokens equal            12/16            6/16         [16/16]
#   mean agreeing prefix                  0.836           0.582         [1.000]
#   teacher-forced top-1 agreement        0.971           0.928         [0.979]
#   |logprob diff| max / mean (nats)  0.199/0.038     0.441/0.094  [0.070/0.015]
#   compacted vs dense W8A8: equal     16/16, top-1 1.0  7/16, top-1 0.958, max 0.255
# Without VNNI oneDNN multiplies with vpmaddubsw, which saturates the int16 sum of each pair of
# u8 x s8 products (cpu_int8_caveat; reproduced by emulating it): outputs move ~1%, and the
# pairs, so the result, change when compaction drops zero input features. That is the kernel,
# not the export, and it is what a user of such a CPU gets; the bounds below are per CPU kind.
# Free-running greedy decoding of a random model diverges for good at its first near tie, so
# whole-sequence equality is a weak measure; the teacher-forced agreement (same context in
# both engines) and the logprobs are the tight ones. The bounds leave room for other CPUs
# (AMX kernels, other oneDNN paths round differently) and still fail a broken export: with
# every weight scale 3% too large it measured (VNNI) top-1 0.938 and logprob diffs 0.375 max /
# 0.083 mean; q/k/v scales in the wrong order: top-1 0.0, logprob diffs 14.7 / 4.8 (any CPU).
NO_VNNI = cpu_int8_caveat() is not None
MIN_FIRST_TOKEN_AGREE = 13 if NO_VNNI else 14  # of 16 prompts
MIN_MEAN_PREFIX = 0.45 if NO_VNNI else 0.6  # mean fraction of the 16 tokens before the first difference
MIN_TOP1_AGREE = 0.89 if NO_VNNI else 0.93  # same context, same greedy choice, over all positions
MAX_LOGPROB_DIFF = 0.7 if NO_VNNI else 0.35  # nats, largest |logprob diff| over every token (~-16..0)
MAX_LOGPROB_MEAN_DIFF = 0.14 if NO_VNNI else 0.06  # nats, mean |logprob diff|
# compacted vs dense W8A8 (the same int8 numbers): prompts all equal, top-1, largest |logprob diff|
MIN_COMPACT_EQUAL = 4 if NO_VNNI else N_PROMPTS - 2
MIN_COMPACT_TOP1 = 0.93 if NO_VNNI else 0.98
MAX_COMPACT_LOGPROB_DIFF = 0.4 if NO_VNNI else 0.1
ENGINE_ARGS = {"dtype": "bfloat16", "enforce_eager": True, "max_model_len": 256, "seed": 0}


def _prompts() -> list[str]:
    """Sentences from documents the tokenizer was not trained on (past the title lines)."""
    return [" ".join(doc.split()[8:16]) for doc in embedded_documents()[30 : 30 + N_PROMPTS]]


def _make_model(vocab: int, **special_ids: int) -> torch.nn.Module:
    """The fp32 test BLOOM, with the heads/neurons outside KEPT_HEADS/KEPT_NEURONS zeroed."""
    cfg = BloomConfig(vocab_size=vocab, hidden_size=HIDDEN, n_layer=N_LAYER, n_head=N_HEAD, **special_ids)
    model = build_from_config("causal_lm", cfg, seed=0).float().eval()
    g = torch.Generator().manual_seed(1)
    head_dim = HIDDEN // N_HEAD
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "transformer.ln_f.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            elif "layernorm" not in name and ".ln_f." not in name:  # other LayerNorms stay 1 / 0
                std = EMBED_STD if "word_embeddings" in name else WEIGHT_STD if p.ndim == 2 else BIAS_STD
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for i, block in enumerate(model.transformer.h):  # what structured pruning leaves
            attn, mlp = block.self_attention, block.mlp
            for h in set(range(N_HEAD)) - set(KEPT_HEADS[i]):
                attn.query_key_value.weight.view(N_HEAD, 3 * head_dim, HIDDEN)[h] = 0
                attn.query_key_value.bias.view(N_HEAD, 3 * head_dim)[h] = 0
                attn.dense.weight.view(HIDDEN, N_HEAD, head_dim)[:, h] = 0
            dropped = sorted(set(range(4 * HIDDEN)) - set(KEPT_NEURONS[i]))
            mlp.dense_h_to_4h.weight[dropped] = 0
            mlp.dense_h_to_4h.bias[dropped] = 0
            mlp.dense_4h_to_h.weight[:, dropped] = 0
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """fp: plain export; compact/sparse: the same model as bloomray exports it when pruned
    (structured: compacted shapes; unstructured: bitmask-packed); *_int8: their W8A8 copies."""
    root = tmp_path_factory.mktemp("quant")
    tok = train_tokenizer(embedded_documents()[:30], 512)
    ids = {
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    model = _make_model(len(tok), **ids)
    dirs = {"fp": root / "fp", "compact": root / "compact", "sparse": root / "sparse"}
    model.save_pretrained(dirs["fp"])
    dirs["compact"].mkdir()
    dirs["sparse"].mkdir()
    write_model(model, dirs["compact"], "structured")
    write_model(model, dirs["sparse"], "magnitude")
    for d in dirs.values():
        tok.save_pretrained(d)
    dirs["int8"] = dirs["fp_int8"] = quantize_w8a8(dirs["fp"], root / "int8")
    dirs["compact_int8"] = quantize_w8a8(dirs["compact"], root / "compact_int8")
    dirs["sparse_int8"] = quantize_w8a8(dirs["sparse"], root / "sparse_int8")
    return dirs


# ---------------------------------------------------------------- without vLLM


@pytest.mark.parametrize("kind", ["fp", "compact", "sparse"])
def test_dequantized_weights_within_one_step(exports, kind):
    original = {k: v for k, v in load_model(exports[kind]).state_dict().items() if k != "lm_head.weight"}
    quant = load_file(str(exports[f"{kind}_int8"] / "model.safetensors"))
    n_quantized = 0
    for name, w in original.items():
        layer = name.rsplit(".", 2)[-2]
        if name.endswith(".weight") and layer in QUANT_TARGETS:
            q, scale = quant[name], quant[name[: -len("weight")] + "weight_scale"]
            assert q.dtype == torch.int8 and q.shape == w.shape
            assert scale.dtype == torch.float32 and scale.shape == (w.shape[0], 1)
            err = (q.float() * scale - w.float()).abs()
            assert bool((err <= scale).all()), f"{name}: error above one step"
            assert bool((err <= scale / 2 + 1e-7).all()), f"{name}: not round-to-nearest"
            nonzero = w.abs().amax(1) > 0
            assert bool((q.abs().amax(1)[nonzero] == 127).all())  # each row's largest |w| -> +-127
            assert not q[~nonzero].any()  # pruned rows stay zero
            n_quantized += 1
        else:  # embeddings, LayerNorms, biases: unchanged, original dtype
            assert quant[name].dtype == w.dtype and torch.equal(quant[name], w), name
    assert n_quantized == N_LAYER * len(QUANT_TARGETS)
    scales = {k[: -len("weight")] + "weight_scale" for k in original if k.endswith(".weight")}
    assert set(quant) == set(original) | {k for k in scales if k in quant}
    assert len(set(quant) - set(original)) == n_quantized
    assert not any(k.startswith("lm_head") for k in quant)  # tied to the embeddings


def test_compacted_and_sparse_keep_what_their_loaders_need(exports):
    src = json.loads((exports["compact"] / "config.json").read_text())
    out = json.loads((exports["compact_int8"] / "config.json").read_text())
    for key in ("model_type", "architectures", SPEC_KEY):
        assert out[key] == src[key], key
    assert out["model_type"] == "bloomray_compact" and out["quantization_config"]["format"] == "int-quantized"
    assert "plugin" in (exports["compact_int8"] / "README.md").read_text()
    # a sparse export is written dense: same tensors as the plain export's W8A8 copy
    cfg = json.loads((exports["sparse_int8"] / "config.json").read_text())
    assert SPARSE_KEY not in cfg and cfg["model_type"] == "bloom"
    assert sorted(p.name for p in exports["sparse_int8"].glob("*.safetensors")) == ["model.safetensors"]
    a = load_file(str(exports["sparse_int8"] / "model.safetensors"))
    b = load_file(str(exports["int8"] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_card_and_tokenizer(exports):
    out = exports["int8"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    assert qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["weights"] == {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "group_size": None,
        "strategy": "channel",
        "dynamic": False,
    }
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "W8A8 int8" in card and "int-quantized" in card and str(exports["fp"]) in card
    # no temp dir left next to the output
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
    # last: skips where vLLM (and so compressed-tensors) is not installed
    ct = pytest.importorskip("compressed_tensors.quantization")  # the format's own schema accepts it
    parsed = ct.QuantizationConfig.model_validate(qc)
    assert parsed.format == "int-quantized" and parsed.config_groups["group_0"].input_activations.dynamic


def test_errors(exports, tmp_path):
    with pytest.raises(QuantizeError, match="not a model directory"):
        quantize_w8a8(tmp_path, tmp_path / "out")
    with pytest.raises(QuantizeError, match="already exists"):
        quantize_w8a8(exports["fp"], exports["int8"])
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_w8a8(exports["int8"], tmp_path / "again")
    from bloomray.cli import main

    # `bloomray quantize` reports a QuantizeError as a usage error (exit 2), not a crash.
    assert main(["quantize", "--model", str(exports["int8"]), "--output", str(tmp_path / "again")]) == 2
    assert list(tmp_path.iterdir()) == []  # nothing written by the failed calls


# ---------------------------------------------------------------- served by vLLM


def _linear_schemes(model: torch.nn.Module) -> dict[str, str]:
    """Run inside vLLM's worker: quant method (and scheme/kernel) of every layer that has one."""
    found = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        desc = type(method).__name__
        scheme = getattr(module, "scheme", None)
        if scheme is not None:
            desc += f"/{type(scheme).__name__}/{type(getattr(scheme, 'kernel', None)).__name__}"
        found[name] = desc
    return found


def _serve(model_dir: Path, prompts: list[str], forced: list[list[int]] | None = None) -> dict:
    """Start one engine, run both passes, shut it down.

    1. greedy generation of ``NEW_TOKENS`` tokens per prompt;
    2. a prefill-only pass over ``forced`` token sequences (default: each prompt followed by
       this engine's own continuation) with ``prompt_logprobs=1``: the logprob of every token
       and the top-1 token at every position, for the same context in both engines.
    """
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), **ENGINE_ARGS)
    try:
        greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        if forced is None:
            forced = [list(o.prompt_token_ids) + t for o, t in zip(outs, tokens, strict=True)]
        scoring = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
        scored = llm.generate([{"prompt_token_ids": ids} for ids in forced], scoring, use_tqdm=False)
        logprobs, top1 = [], []
        for ids, o in zip(forced, scored, strict=True):
            positions = list(zip(ids[1:], o.prompt_logprobs[1:], strict=True))  # position 0 has none
            logprobs.append([lp[t].logprob for t, lp in positions])
            top1.append([next(k for k, v in lp.items() if v.rank == 1) for _, lp in positions])
        return {
            "quantization": llm.llm_engine.model_config.quantization,
            "schemes": llm.apply_model(_linear_schemes)[0],
            "tokens": tokens,
            "forced": forced,
            "logprobs": logprobs,
            "top1": top1,
        }
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def served(exports):
    """vLLM results for the bf16 export, its W8A8 copy and the compacted export's W8A8 copy,
    one engine after the other."""
    pytest.importorskip("vllm")
    cores = sorted(os.sched_getaffinity(0))[:2]
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),  # core ids, not "all"
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # apply_model sends a function to the worker
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        prompts = _prompts()
        ref = _serve(exports["fp"], prompts)
        yield {"fp": ref} | {
            kind: _serve(exports[kind], prompts, forced=ref["forced"]) for kind in ("int8", "compact_int8")
        }


def test_vllm_reports_w8a8(served):
    assert served["fp"]["quantization"] is None
    assert not any("CompressedTensors" in v for v in served["fp"]["schemes"].values())
    for kind in ("int8", "compact_int8"):
        assert served[kind]["quantization"] == "compressed-tensors"
        schemes = served[kind]["schemes"]
        blocks = {k: v for k, v in schemes.items() if ".h." in k and k.rsplit(".", 1)[-1] in QUANT_TARGETS}
        assert len(blocks) == N_LAYER * len(QUANT_TARGETS), schemes
        for name, desc in blocks.items():
            assert desc.startswith("CompressedTensorsLinearMethod/CompressedTensorsW8A8Int8/"), (name, desc)
            assert "Int8ScaledMMLinearKernel" in desc, (name, desc)
        assert "CompressedTensors" not in schemes.get("lm_head", "")


def test_compacted_w8a8_serves_like_dense_w8a8(served):
    """bloomray's vLLM plugin loads the compacted W8A8 copy (scales split per q/k/v shard, heads
    padded): the pruned rows/columns it drops are zeros, so its int8 weights, scales and
    per-token activation scales equal the dense copy's and only the summation order differs
    (which matters without VNNI, where the kernel saturates pairs of products)."""
    dense, compact = served["int8"], served["compact_int8"]
    same = sum(a == b for a, b in zip(dense["tokens"], compact["tokens"], strict=True))
    pairs = [
        (a, b)
        for ra, rb in zip(dense["top1"], compact["top1"], strict=True)
        for a, b in zip(ra, rb, strict=True)
    ]
    top1 = sum(a == b for a, b in pairs) / len(pairs)
    diffs = [
        abs(a - b)
        for ra, rb in zip(dense["logprobs"], compact["logprobs"], strict=True)
        for a, b in zip(ra, rb, strict=True)
    ]
    print(
        f"compacted vs dense W8A8: {same}/{N_PROMPTS} equal, top-1 {top1:.3f}, |logprob diff| max {max(diffs):.4f}"
    )
    assert same >= MIN_COMPACT_EQUAL
    assert top1 >= MIN_COMPACT_TOP1
    assert max(diffs) <= MAX_COMPACT_LOGPROB_DIFF


def _prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_generations_agree(served):
    ref, quant = served["fp"]["tokens"], served["int8"]["tokens"]
    assert len({tuple(t) for t in ref}) >= N_PROMPTS - 2, "continuations should differ per prompt"
    assert sum(len(set(t)) for t in ref) / N_PROMPTS >= NEW_TOKENS / 2, "continuations should vary"
    first = sum(a[0] == b[0] for a, b in zip(ref, quant, strict=True))
    same = sum(a == b for a, b in zip(ref, quant, strict=True))
    mean_prefix = sum(_prefix(a, b) for a, b in zip(ref, quant, strict=True)) / (N_PROMPTS * NEW_TOKENS)
    print(
        f"free-running greedy: first token agrees {first}/{N_PROMPTS}, all {NEW_TOKENS} tokens "
        f"{same}/{N_PROMPTS}, mean agreeing prefix {mean_prefix:.3f}"
    )
    assert first >= MIN_FIRST_TOKEN_AGREE
    assert mean_prefix >= MIN_MEAN_PREFIX


def test_teacher_forced_top1_agree(served):
    """Same context in both engines (prompt + bf16 continuation): the greedy choice per position."""
    ref, quant = served["fp"]["top1"], served["int8"]["top1"]
    pairs = [(a, b) for ra, rb in zip(ref, quant, strict=True) for a, b in zip(ra, rb, strict=True)]
    agree = sum(a == b for a, b in pairs) / len(pairs)
    print(f"teacher-forced top-1 agreement {agree:.3f} over {len(pairs)} positions")
    assert agree >= MIN_TOP1_AGREE


def _fp32_logprobs(model_dir: Path, sequences: list[list[int]]) -> list[list[float]]:
    """The same per-token logprobs from the fp32 model in transformers: the yardstick."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in sequences:
            x = torch.tensor([ids])
            lp = torch.log_softmax(model(input_ids=x).logits.float(), -1)[0, :-1]
            out.append(lp.gather(-1, x[0, 1:, None])[:, 0].tolist())
    return out


def test_logprobs_close(served, exports):
    """Logprob of every token of prompt + continuation, W8A8 vs bf16 (both vLLM)."""
    ref, quant = served["fp"]["logprobs"], served["int8"]["logprobs"]
    pairs = [(a, b) for ra, rb in zip(ref, quant, strict=True) for a, b in zip(ra, rb, strict=True)]
    diffs = [abs(a - b) for a, b in pairs]
    fp32 = _fp32_logprobs(exports["fp"], served["fp"]["forced"])
    bf16_err = [abs(a - c) for ra, rc in zip(ref, fp32, strict=True) for a, c in zip(ra, rc, strict=True)]
    lps = torch.tensor([a for a, _ in pairs])
    print(
        f"logprobs: {len(pairs)} tokens (bf16 mean {float(lps.mean()):.2f}, min {float(lps.min()):.2f}); "
        f"W8A8 vs bf16 |diff| max {max(diffs):.4f} mean {sum(diffs) / len(diffs):.4f}; "
        f"yardstick bf16 vLLM vs fp32 transformers max {max(bf16_err):.4f} mean {sum(bf16_err) / len(bf16_err):.4f}"
    )
    assert max(diffs) <= MAX_LOGPROB_DIFF
    assert sum(diffs) / len(diffs) <= MAX_LOGPROB_MEAN_DIFF
