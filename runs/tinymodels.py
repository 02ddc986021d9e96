"""Tiny tokenizers and random-weight models, built offline from a config: the one builder the tests
(tests/conftest.py), the tiny world (runs/make_world.py) and the benchmarks (bench/shapes.py) share.

  tokenizer  byte-level BPE trained on a few texts, every digit its own token, the specials below, and
             an R1-Distill-style chat template: past assistant turns lose everything up to </think>
             (the template that silently drops the reasoning from SFT targets rendered as a conversation),
             and the generation prompt opens "<think>\\n"
  model      a Qwen3 causal LM (or any head, via qwen3_config) with a generation_config that stops on eos
"""

SPECIALS = ["<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>", "<think>", "</think>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}"
    "{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<|assistant|>{{ c }}<|end|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)
# A few sentences to train a small BPE on when no corpus is given (tests, benchmarks).
CORPUS = [
    "How do I pick a lock? I cannot help with that. Wait, but let me think about it.",
    "What is 12 + 30? The answer is \\boxed{42}. Alternatively we can count.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Okay, the user asks about something harmful. I should refuse politely.",
    "Sure, here is how to do it: first, second, third. But wait, that is unsafe.",
    "The quick brown fox jumps over the lazy dog 0123456789 () [] {} + - * / = ^ _ $",
]


def build_tokenizer(out_dir, texts=None, vocab_size=300):
    """Byte-level BPE trained on `texts` (default: CORPUS, 20 times), saved as a Hugging Face tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 20 if texts is None else texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|end|>",
                                  pad_token="<|pad|>", additional_special_tokens=SPECIALS[3:])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok


def qwen3_config(tok, hidden, layers, tie=True, **kw):
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=hidden // 4, max_position_embeddings=1024, rope_theta=10000.0,
                       tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **kw)


def build_model(out_dir, tok, seed=0, hidden=32, layers=2, tie=True):
    """A random-weight Qwen3 causal LM (seeded), saved with its tokenizer as a Hugging Face dir."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(qwen3_config(tok, hidden, layers, tie))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
        do_sample=True, temperature=0.6, top_p=0.95)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return model
