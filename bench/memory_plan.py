"""Memory per GPU of the paper's 7B RL run on 8 GPUs, by arithmetic from the real configs' numbers
(parameters counted on the meta device; nothing is downloaded or allocated).

  policy / reference  DeepSeek-R1-Distill-Qwen-7B (Qwen2): hidden 3584, 28 layers, 28 heads, 4 KV heads,
                      head_dim 128, MLP 18944, vocab 152064, untied lm_head
  reward model        Skywork-Reward-V2-Llama-3.1-8B (LlamaForSequenceClassification): hidden 4096,
                      32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 128256, a 1-output score head

What rl.py holds (defaults: FSDP2 over all ranks, fp32 master weights, bf16 compute, fp32 gradient
reduction, AdamW; the reference in bf16, sharded; the reward model whole on every rank, bf16):

  python bench/memory_plan.py [--world 8] [--prompt-tokens 512] [--new-tokens 4096]
"""
import torch

import flags

GB = 1e9


def n_params(cfg, cls):
    with torch.device("meta"):
        m = cls.from_config(cfg) if hasattr(cls, "from_config") else cls(cfg)
    return sum(p.numel() for p in m.parameters()), m


def main():
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, Qwen2Config)
    p = flags.parser(__doc__)
    p.add_argument("--world", type=int, default=8, help="GPUs (one FSDP2 shard group)")
    p.add_argument("--rollout-batch", type=int, default=32, help="prompts per step (rl.py default)")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (rl.py default)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="rendered prompt length assumed for the KV cache")
    p.add_argument("--new-tokens", type=int, default=4096, help="--max-new-tokens")
    p.add_argument("--micro-batch", type=int, default=4, help="--micro-batch-size (training activations)")
    args = p.parse_args()

    pol_cfg = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                          max_position_embeddings=131072)
    rm_cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, num_labels=1, max_position_embeddings=131072)
    N, pol = n_params(pol_cfg, AutoModelForCausalLM)
    N_rm, _ = n_params(rm_cfg, AutoModelForSequenceClassification)
    layer = sum(p.numel() for p in pol.model.layers[0].parameters())
    root = N - layer * pol_cfg.num_hidden_layers  # embed + lm_head + final norm: FSDP2's root group
    W = args.world
    seqs = args.rollout_batch * args.samples // W  # rollout sequences per rank (one sampler batch of <= 64)
    T = args.prompt_tokens + args.new_tokens
    cap = -(-(T + 16) // 256) * 256  # engine.py's static cache: longest prompt + max new + check_every, 256-bucketed
    head_dim = pol_cfg.hidden_size // pol_cfg.num_attention_heads
    kv_tok = 2 * pol_cfg.num_hidden_layers * pol_cfg.num_key_value_heads * head_dim * 2  # bytes
    D, L = pol_cfg.hidden_size, pol_cfg.num_hidden_layers

    rows = [
        ("policy master weights, fp32, 1/W shard", 4 * N / W, "always"),
        ("AdamW m and v, fp32, 1/W shard", 8 * N / W, "always"),
        ("gradients, fp32, 1/W shard", 4 * N / W, "update"),
        ("reference, bf16, 1/W shard", 2 * N / W, "always"),
        ("reward model, bf16, whole on every rank", 2 * N_rm, "always"),
        ("policy unsharded bf16 while generating (engine.generation_view)", 2 * N, "rollout"),
        (f"static KV cache, bf16: {seqs} rows x {cap} tokens x {kv_tok} B/token", seqs * cap * kv_tok, "rollout"),
        ("root group unsharded (embed + lm_head), bf16, in a forward", 2 * root, "update"),
        ("one layer unsharded bf16 + its fp32 gradient before reduce-scatter", 6 * layer, "update"),
        ("root group's fp32 gradient before reduce-scatter", 4 * root, "update"),
        (f"checkpointed layer inputs, bf16: {args.micro_batch} x {T} x {D} x {L}", 2 * args.micro_batch * T * D * L,
         "update"),
        (f"one layer recomputed: MLP activations, bf16, 3 x {args.micro_batch} x {T} x {pol_cfg.intermediate_size}",
         2 * 3 * args.micro_batch * T * pol_cfg.intermediate_size, "update"),
        ("fused lm_head: one 4096-token chunk of bf16 logits", 2 * 4096 * pol_cfg.vocab_size, "update"),
    ]
    print(f"policy {N / 1e9:.3f} B params ({layer / 1e6:.1f} M per layer, root {root / 1e6:.1f} M); "
          f"reward model {N_rm / 1e9:.3f} B; world {W}")
    print("| what | GB per GPU | when |\n|---|---|---|")
    for what, b, when in rows:
        print(f"| {what} | {b / GB:.2f} | {when} |")
    for phase in ("rollout", "update"):
        tot = sum(b for _, b, w in rows if w in ("always", phase))
        print(f"| **peak during {phase}** | **{tot / GB:.1f}** | |")


if __name__ == "__main__":
    main()
