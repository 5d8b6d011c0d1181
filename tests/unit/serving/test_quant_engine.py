"""int8 quantization and the batched engine on a tiny model (no Ray)."""

import torch

from bloomray.data.corpus import embedded_documents
from bloomray.data.tokenizer import train_tokenizer
from bloomray.model.build import build_from_config, preset_config
from bloomray.serving.engine import GenerationEngine, GenParams
from bloomray.serving.quant import quantize_int8


def _tiny():
    tok = train_tokenizer(embedded_documents()[:10], 300)
    ids = {
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    return build_from_config("causal_lm", preset_config("tiny", len(tok), **ids), seed=0).eval(), tok


def test_int8_keeps_logits_close_and_generates():
    model, tok = _tiny()
    q = quantize_int8(model)
    assert any("quantized" in type(m).__module__ for m in q.modules())
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits, q(input_ids=ids).logits
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    out = GenerationEngine(q, tok).generate([GenParams("The for statement", 6, 0.0)])
    assert out[0].completion_tokens <= 6


def test_sampling_is_reproducible_per_seed_inside_a_batch():
    model, tok = _tiny()
    eng = GenerationEngine(model, tok)
    alone = eng.generate([GenParams("Classes", 8, 1.0, 0.9, seed=7)])[0].text
    batched = eng.generate(
        [GenParams("Other prompt here", 5, 0.0), GenParams("Classes", 8, 1.0, 0.9, seed=7)]
    )
    assert batched[1].text == alone
