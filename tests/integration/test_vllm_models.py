"""vLLM serves bloomray exports exactly like transformers does: dense and compacted BLOOM.

The compacted export keeps different numbers of heads (none of them a prefix of the original
heads) and MLP neurons per layer, so vLLM's model (``bloomray.model.vllm_bloom``, loaded
through the ``vllm.general_plugins`` entry point) must pad heads and keep each head's original
ALiBi slope to reproduce the reference. Greedy fp32 tokens from one batched vLLM call must
equal bloomray's transformers reference (``load_model`` + ``generate``, one prompt at a time).

Shapes: hidden 128 with 4 heads (head size 32; vLLM's CPU attention supports only some head
sizes, the ``tiny`` preset's 16 is not one of them).
"""

from __future__ import annotations

import gc
import json
import os
import random
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

HIDDEN, N_LAYER, N_HEAD = 128, 3, 4
HEAD_DIM, FFN = HIDDEN // N_HEAD, 4 * HIDDEN
# Kept heads per layer: different counts (max 3 < 4, so even the widest layer is padded),
# and not prefixes of 0..3, so a head given the wrong ALiBi slope changes the output.
KEPT_HEADS = [[1, 3], [0, 2, 3], [2]]
KEPT_NEURONS = [list(range(0, FFN, 2)), list(range(FFN // 4, FFN)), list(range(5, FFN, 7))]
N_PROMPTS, MAX_NEW_TOKENS, MAX_MODEL_LEN = 120, 12, 256

WORDS = (
    "the a model ray serve bloom token head layer prune dense sparse cache batch train loss "
    "river stone light window garden paper music number seven blue quick slow bright dark "
    "open close north south winter summer apple orange engine signal market story"
).split()


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(n)]


def make_tokenizer():
    from bloomray.data.tokenizer import train_tokenizer

    return train_tokenizer(corpus(400, seed=0), vocab_size=320, min_frequency=1)


def make_model(vocab: int, seed: int = 0) -> torch.nn.Module:
    """fp32 BLOOM (hidden 128, 4 heads) with weights scaled up so tokens depend on the prompt."""
    from transformers import BloomConfig

    from bloomray.model.build import build_from_config

    cfg = BloomConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    model = build_from_config("causal_lm", cfg, seed=seed).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" not in name and "ln_f" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 2 else 0.1))
    return model


def prune_to_spec(model: torch.nn.Module) -> None:
    """Zero every head/neuron not in KEPT_HEADS/KEPT_NEURONS (what structured pruning leaves)."""
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            attn, mlp = block.self_attention, block.mlp
            qkv_w = attn.query_key_value.weight.view(N_HEAD, 3 * HEAD_DIM, HIDDEN)
            qkv_b = attn.query_key_value.bias.view(N_HEAD, 3 * HEAD_DIM)
            dense_w = attn.dense.weight.view(HIDDEN, N_HEAD, HEAD_DIM)
            for h in set(range(N_HEAD)) - set(KEPT_HEADS[i]):
                qkv_w[h], qkv_b[h], dense_w[:, h] = 0, 0, 0
            dropped = sorted(set(range(FFN)) - set(KEPT_NEURONS[i]))
            mlp.dense_h_to_4h.weight[dropped] = 0
            mlp.dense_h_to_4h.bias[dropped] = 0
            mlp.dense_4h_to_h.weight[:, dropped] = 0


def write_export(out: Path, tok, structured: bool) -> Path:
    """A bloomray export (dense, or structured-pruned and compacted) with its tokenizer."""
    from bloomray.export.consolidate import write_model

    model = make_model(len(tok))
    if structured:
        prune_to_spec(model)
    write_model(model, out, "structured" if structured else "none")
    tok.save_pretrained(str(out))
    return out


def prompts(n: int = N_PROMPTS) -> list[str]:
    """n prompts of 1 to ~60 tokens, all different."""
    rng = random.Random(1)
    out = []
    for i in range(n):
        out.append(f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 3 + i // 3))))
    return out


@torch.no_grad()
def reference_tokens(model_dir: Path, ids: list[list[int]]) -> list[list[int]]:
    """Greedy new tokens from bloomray's transformers path, one prompt at a time."""
    from bloomray.export.load import load_model

    model = load_model(model_dir)
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and the box is shared
    try:
        for prompt in ids:
            x = torch.tensor([prompt])
            gen = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=MAX_NEW_TOKENS,
                min_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                pad_token_id=3,
            )
            out.append(gen[0, x.shape[1] :].tolist())
    finally:
        torch.set_num_threads(threads)
    return out


VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",  # core ids ("all" is refused)
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # lets llm.apply_model send a test's function
    "HF_HUB_OFFLINE": "1",
}


@pytest.fixture(scope="module")
def vllm_env():
    pytest.importorskip("vllm")
    saved = {k: os.environ.get(k) for k in VLLM_ENV}
    os.environ.update(VLLM_ENV)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm_exports")
    tok = make_tokenizer()
    return {
        "dense": write_export(root / "dense", tok, structured=False),
        "compact": write_export(root / "compact", tok, structured=True),
    }


@pytest.fixture(scope="module")
def token_ids(exports) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(exports["compact"]))  # loads despite model_type bloomray_compact
    ids = [tok(p)["input_ids"] for p in prompts()]
    lengths = sorted(len(i) for i in ids)
    assert lengths[0] <= 3 and lengths[-1] >= 30, lengths  # prompts of different lengths
    return ids


@pytest.fixture(scope="module", params=["dense", "compact"])
def served(request, vllm_env, exports):
    """(kind, one vLLM engine on that export): fp32, eager; shut down after the module's tests."""
    from vllm import LLM

    llm = LLM(
        model=str(exports[request.param]),
        dtype="float32",
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        seed=0,
    )
    yield request.param, llm
    llm.llm_engine.engine_core.shutdown(timeout=30)  # stops the engine core and worker processes
    del llm
    gc.collect()


# --------------------------------------------------------------------------- export format


def test_compact_export_names_its_own_architecture(exports):
    from bloomray.export.load import load_model, task_of
    from bloomray.model.compact import SPEC_KEY

    raw = json.loads((exports["compact"] / "config.json").read_text())
    assert raw["architectures"] == ["BloomrayCompactForCausalLM"]
    assert raw["model_type"] == "bloomray_compact"
    assert raw[SPEC_KEY]["heads"] == KEPT_HEADS
    assert [len(n) for n in raw[SPEC_KEY]["neurons"]] == [len(n) for n in KEPT_NEURONS]
    assert task_of(raw) == "causal_lm"
    dense = json.loads((exports["dense"] / "config.json").read_text())
    assert dense["architectures"] == ["BloomForCausalLM"] and dense["model_type"] == "bloom"
    model = load_model(exports["compact"])
    assert [b.self_attention.num_heads for b in model.transformer.h] == [2, 3, 1]


def test_auto_model_loads_compact_dir_through_bloomray_class(exports):
    from transformers import AutoConfig, AutoModelForCausalLM

    import bloomray.model  # noqa: F401 - registers model_type bloomray_compact with transformers
    from bloomray.export.load import load_model
    from bloomray.model.compact_hf import BloomrayCompactConfig, BloomrayCompactForCausalLM

    d = exports["compact"]
    assert type(AutoConfig.from_pretrained(str(d))) is BloomrayCompactConfig
    auto = AutoModelForCausalLM.from_pretrained(str(d)).eval()
    assert type(auto) is BloomrayCompactForCausalLM
    assert [b.self_attention.kept_heads.tolist() for b in auto.transformer.h] == KEPT_HEADS
    ref = load_model(d)
    ids = torch.randint(4, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = auto(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.equal(a, b)
    assert auto.lm_head.weight is auto.transformer.word_embeddings.weight


def test_older_compact_dir_with_model_type_bloom_still_loads(exports, tmp_path):
    """Dirs compacted before model_type bloomray_compact: model_type bloom, BloomForCausalLM + spec."""
    import shutil

    from bloomray.export.load import load_model, task_of
    from bloomray.model.compact_hf import BloomrayCompactForCausalLM

    old = tmp_path / "old"
    shutil.copytree(exports["compact"], old)
    raw = json.loads((old / "config.json").read_text())
    raw.update(model_type="bloom", architectures=["BloomForCausalLM"])
    (old / "config.json").write_text(json.dumps(raw))
    assert task_of(raw) == "causal_lm"
    model, ref = load_model(old), load_model(exports["compact"])
    assert type(model) is BloomrayCompactForCausalLM
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_vllm_alibi_slopes_match_transformers():
    pytest.importorskip("vllm")
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    from bloomray.model.vllm_bloom import alibi_slopes

    for n in (1, 2, 3, 4, 5, 6, 8, 12, 16, 30, 32, 40, 64):
        # build_alibi_tensor: slope * position; at position 1 it is the slope itself.
        ref = build_alibi_tensor(torch.ones(1, 2), n, torch.float32)[:, 0, 1].tolist()
        assert alibi_slopes(n) == ref, n
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # vLLM builds a bf16 model under this default
        try:
            assert alibi_slopes(n) == ref, n
        finally:
            torch.set_default_dtype(default)


# --------------------------------------------------------------------------- vLLM vs transformers


def test_vllm_greedy_tokens_equal_transformers(served, exports, token_ids):
    from vllm import SamplingParams

    kind, llm = served
    ref = reference_tokens(exports[kind], token_ids)
    params = SamplingParams(
        temperature=0.0, max_tokens=MAX_NEW_TOKENS, min_tokens=MAX_NEW_TOKENS, ignore_eos=True
    )
    results = llm.generate([{"prompt_token_ids": p} for p in token_ids], params, use_tqdm=False)  # one batch
    got = [list(r.outputs[0].token_ids) for r in results]
    # The test could fail: generations differ between prompts (not one repeated token).
    assert len({tuple(r) for r in ref}) > N_PROMPTS // 2
    assert len({t for r in ref for t in r}) > 20
    mismatches = [i for i, (r, g) in enumerate(zip(ref, got, strict=True)) if r != g]
    assert not mismatches, (
        f"{kind}: {len(mismatches)}/{len(ref)} prompts differ; first {mismatches[0]}: "
        f"transformers {ref[mismatches[0]]} vs vLLM {got[mismatches[0]]}"
    )


def gelu_kind(act) -> str:
    """``GELU:tanh`` for torch's tanh-approximation GELU; vLLM's own (erf) GELU has no ``approximate``."""
    return f"{type(act).__name__}:{getattr(act, 'approximate', '')}"


def engine_layout(model) -> tuple[str, list[dict]]:
    """What the vLLM model looks like per layer; runs in vLLM's worker (module-level: pickled by name).

    Biases only: on CPU vLLM may repack Linear weights into its GEMM library and drop ``weight``.
    """
    layers = []
    for block in model.transformer.h:
        attn = block.self_attention
        qkv_bias = attn.query_key_value.bias.detach().view(3, attn.attn.num_heads, -1)  # [q|k|v] per head
        layers.append(
            {
                "heads": attn.attn.num_heads,
                "slopes": attn.attn.impl.alibi_slopes.tolist(),
                "zero_heads": [h for h in range(qkv_bias.shape[1]) if not qkv_bias[:, h].any()],
                "mlp_width": block.mlp.dense_h_to_4h.bias.shape[0],
                "gelu": gelu_kind(getattr(block.mlp, "gelu", None) or block.mlp.gelu_impl),
            }
        )
    return type(model).__name__, layers


def test_vllm_model_layout(served):
    """Inside the engine: the plugin's classes, padded heads (zero weights), original slopes."""
    from bloomray.model.vllm_bloom import alibi_slopes

    kind, llm = served
    name, layers = llm.apply_model(engine_layout)[0]
    slopes = alibi_slopes(N_HEAD)
    assert all(layer["gelu"] == "GELU:tanh" for layer in layers)  # BLOOM's tanh GELU, one fused op
    if kind == "dense":
        assert name == "BloomrayBloomForCausalLM"
        assert all(layer["heads"] == N_HEAD and layer["slopes"] == slopes for layer in layers)
        assert all(layer["zero_heads"] == [] and layer["mlp_width"] == FFN for layer in layers)
        return
    assert name == "BloomrayCompactForCausalLM"
    padded = max(len(h) for h in KEPT_HEADS)
    for layer, kept, neurons in zip(layers, KEPT_HEADS, KEPT_NEURONS, strict=True):
        assert layer["heads"] == padded
        assert layer["slopes"] == [slopes[h] for h in kept] + [0.0] * (padded - len(kept))
        assert layer["zero_heads"] == list(range(len(kept), padded))  # the padding, and only it
        assert layer["mlp_width"] == len(neurons)
