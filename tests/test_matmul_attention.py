"""CPU attention by bf16 matmuls keeping the probabilities (distft/models/matmul_attention.py)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg, losses, TINY
from distft.models import lean, matmul_attention
from test_lean import saved_bytes, tiny_gqa_llama


def inputs(heads=8, kv_heads=2, length=12, dim=8, seed=1):
    """q, k, v (fp32, requiring grad) and a bool mask: row 0 left-padded (its first three
    queries see nothing), row 1 two packed documents (block-diagonal causal)."""
    torch.manual_seed(seed)
    q = torch.randn(2, heads, length, dim, requires_grad=True)
    k = torch.randn(2, kv_heads, length, dim, requires_grad=True)
    v = torch.randn(2, kv_heads, length, dim, requires_grad=True)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = causal.expand(2, 1, length, length).clone()
    mask[0, :, :, :3] = False
    mask[1, :, 5:, :5] = False
    return q, k, v, mask


def marked_attention():
    attn = tiny_gqa_llama().model.layers[0].self_attn
    assert matmul_attention.mark(attn) == 1
    return attn


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
def test_matches_sdpa_within_bf16_rounding(heads, kv_heads):
    """Against fp32 SDPA: the output and gradients of the rows that attend to something, as
    close as bf16 SDPA's (within 2x its error); rows with nothing to attend to stay finite
    and give no gradient where the loss ignores them."""
    q, k, v, mask = inputs(heads, kv_heads)
    live = mask.any(-1).squeeze(1)  # (batch, query): False for the left-padded queries
    torch.manual_seed(7)
    upstream = torch.randn(2, q.shape[2], heads, q.shape[3]) * live[:, :, None, None]

    def run(fn):
        out = fn()
        return (out.float(), *torch.autograd.grad(out.float(), (q, k, v), upstream))

    ref = run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2))
    sdpa_bf16 = run(lambda: F.scaled_dot_product_attention(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask, enable_gqa=True).transpose(1, 2))
    got = run(lambda: matmul_attention.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, None))
    assert got[0].isfinite().all()
    for i, (g, b, r) in enumerate(zip(got, sdpa_bf16, ref)):
        if i == 0:
            g, b, r = g[live], b[live], r[live]
        err, bf16_err = (g - r).norm() / r.norm(), (b - r).norm() / r.norm()
        assert err <= 2 * bf16_err + 1e-3, (i, err.item(), bf16_err.item())


def test_keeps_q_k_v_and_the_bf16_probabilities():
    q, k, v, mask = inputs()
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    kept, out = saved_bytes(matmul_attention.attend, q, k, v, mask, None)
    probs = 2 * q.shape[1] * q.shape[2] * k.shape[2] * 2  # batch x heads x queries x keys, 2 bytes
    assert kept == q.nbytes + k.nbytes + v.nbytes + probs
    assert out.dtype == torch.bfloat16


def test_sdpa_takes_the_matmul_path_only_where_it_applies():
    attn = marked_attention()
    q, k, v, mask = inputs()
    lean._register_sdpa()

    def path(q, k, v, mask, **kw):
        return matmul_attention.applies(attn, q, k, v, mask, kw.pop("dropout", 0.0), kw)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert path(q, k, v, mask)  # fp32 inputs, bf16 autocast
        with torch.no_grad():
            assert not path(q, k, v, mask)  # eval
        assert not path(q, k, v, mask, dropout=0.1)
        assert not path(q, k, v, None)
        long_k = torch.randn(2, 2, matmul_attention.MAX_KEYS + 1, 8, requires_grad=True)
        assert not path(q, long_k, long_k, torch.ones(2, 1, 12, long_k.shape[2], dtype=torch.bool))
        unmarked = tiny_gqa_llama().model.layers[0].self_attn
        assert not matmul_attention.applies(unmarked, q, k, v, mask, 0.0, {})
        # the registered sdpa function dispatches to it: the same output as attend's
        got, _ = lean.sdpa_attention(attn, q, k, v, mask)
        want = matmul_attention.attend(q, k, v, mask, None)
    assert torch.equal(got, want)
    assert path(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)  # bf16 inputs, no autocast
    assert not path(q, k, v, mask)  # fp32: SDPA's kernel


def test_training_in_bf16_with_matmul_and_flash_attention(tmp_path, caplog):
    """The default (matmul) and trainer.cpu_attention=flash train to the same losses within
    bf16 rounding; the log says which ran (in fp32 neither claims the matmul path); an
    unknown choice is refused at config time."""
    from distft.errors import ConfigError
    from distft.train import run as train
    from distft.trainer import check_config

    run = [*TINY, "trainer.precision=bf16", "strategy=lora", "trainer.max_steps=4", "trainer.eval_every=0",
           "trainer.save_every=0"]
    with caplog.at_level("INFO", logger="distft"):
        train(compose_cfg(tmp_path / "matmul", run))
    assert "attention: bf16 training on CPU by matmuls, probabilities kept, up to 512 keys (2 attention modules" \
        in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="distft"):
        train(compose_cfg(tmp_path / "flash", [*run, "trainer.cpu_attention=flash"]))
    assert "attention: bf16 training on CPU by matmuls" not in caplog.text
    got, want = losses(tmp_path / "matmul"), losses(tmp_path / "flash")
    assert list(got) == list(want) == [1, 2, 3, 4]
    assert got == pytest.approx(want, rel=2e-2)
    assert got != want  # bf16 scores rounded before the softmax: the matmul path ran
    caplog.clear()
    with caplog.at_level("INFO", logger="distft"):  # fp32: SDPA's kernel, and the log does not claim otherwise
        train(compose_cfg(tmp_path / "fp32", [*run, "trainer.precision=fp32"]))
    assert "attention: bf16 training on CPU by matmuls" not in caplog.text
    with pytest.raises(ConfigError, match="trainer.cpu_attention='fast': choose matmul or flash"):
        check_config(compose_cfg(tmp_path / "bad", [*TINY, "trainer.cpu_attention=fast"]))


def test_causal_masks_skip_the_scores_no_query_sees():
    """From SPLIT_FROM queries on, under a causal mask (here packed documents), the first half
    of the queries is computed against the first half of the keys only: the output and
    gradients of the whole computation (the same values, summed in another order) at every
    query that sees a key (a left-padded one averages v over its block's keys instead of all
    of them, and gets no gradient), keeping 3/4 of the probabilities; a mask that lets an
    early query see a late key keeps it whole."""
    t = matmul_attention.SPLIT_FROM
    q, k, v, mask = inputs(heads=4, kv_heads=2, length=t, dim=8)
    q, k, v = (x.detach().bfloat16().requires_grad_() for x in (q, k, v))
    additive, tiles = matmul_attention._additive(mask, torch.bfloat16)
    assert tiles == ((0, t // 2, t // 2), (t // 2, t, t))
    live = mask.any(-1).squeeze(1)  # (batch, query)
    torch.manual_seed(3)
    upstream = (torch.randn(2, 4, t, 8) * live[:, None, :, None]).bfloat16()

    def run(tiles):
        out = matmul_attention._MatmulAttentionFn.apply(q, k, v, additive, 0.3, tiles)
        return (out, *torch.autograd.grad(out, (q, k, v), upstream))

    split, whole = run(tiles), run(((0, t, t),))
    split, whole = (split[0].transpose(1, 2)[live], *split[1:]), (whole[0].transpose(1, 2)[live], *whole[1:])
    for got, expected in zip(split, whole):
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2 * float(expected.abs().max()))
    assert float((split[0].float() - whole[0].float()).norm() / whole[0].float().norm()) < 5e-3
    kept, _ = saved_bytes(matmul_attention.attend, q, k, v, mask, None)
    probs = 2 * 4 * t * t * 2 * 3 // 4
    assert kept == q.nbytes + k.nbytes + v.nbytes + probs

    seeing = mask.clone()
    seeing[1, 0, 0, t - 1] = True
    assert matmul_attention._tiles(seeing) == ((0, t, t),)
    assert matmul_attention._tiles(mask[..., : t - 2, : t - 2]) == ((0, t - 2, t - 2),)  # below SPLIT_FROM
