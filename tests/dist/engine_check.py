"""Run under torchrun by tests/test_engine.py: an FSDP2-wrapped policy on 2 gloo ranks; each rank decodes
its strided share of the prompts through engine.generation_view, counting every torch.distributed call
made during decoding; rank 0 writes the counts and every rank's completions."""
import json
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, ".")
import cli  # noqa: E402
import common  # noqa: E402
import engine  # noqa: E402

KW = dict(max_new_tokens=12, stop_ids=[5], pad_id=0, temperature=1.0, top_p=0.9, seed=4, len_bucket=8,
          check_every=3, batch_size=3)


def make_model():
    from transformers import AutoModelForCausalLM, Qwen3Config
    cfg = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def prompts_and_ids():
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (4, 9, 2, 7, 5, 3, 8)]
    return prompts, list(range(len(prompts)))


if __name__ == "__main__":
    d = common.init_dist()
    policy = common.Policy(make_model())
    common.fsdp_wrap(policy, param_dtype=torch.float32)
    prompts, ids = prompts_and_ids()
    calls = []
    names = [n for n in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
                         "all_to_all", "barrier", "send", "recv", "all_gather_object") if hasattr(dist, n)]
    saved = {n: getattr(dist, n) for n in names}
    with engine.generation_view(policy) as m:
        w = policy.hf.model.layers[0].self_attn.q_proj.weight
        alias = m.model.layers[0].self_attn.q_proj.weight.data_ptr() == w.data_ptr() and not hasattr(w, "full_tensor")
        for n in names:
            setattr(dist, n, lambda *a, _n=n, **k: (calls.append(_n), saved[_n](*a, **k))[1])
        outs = engine.generate(m, prompts[d.rank::2], row_ids=ids[d.rank::2], **KW)
        for n in names:
            setattr(dist, n, saved[n])
    res = common.gather_objects([{"calls": len(calls), "alias": alias, "completions": [o["completion_ids"] for o in outs]}])
    if d.rank == 0:
        json.dump({"collectives_during_decode": [r["calls"] for r in res], "unshard_aliases": [r["alias"] for r in res],
                   "completions": [r["completions"] for r in res], "kw": json.dumps(KW)}, open(sys.argv[1], "w"))
    cli.finish()
