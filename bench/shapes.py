"""Random-weight models with the shapes of real checkpoints, for benchmarks (no hub access)."""
import torch

# Qwen2.5 shapes unless `family` says otherwise (config.json of the public checkpoints); "tiny" is for a CPU smoke
# run of a bench.
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    # other families, for exactness checks at real shapes (config.json of Llama-3.1-8B and Qwen3-1.7B)
    "llama3.1-8b": dict(family="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192}),
    "qwen3-1.7b": dict(family="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "tiny-llama": dict(family="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True),  # ~41M: CPU numbers
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
}


def random_model(shape, dtype, device):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config
    kw = dict(SHAPES[shape])
    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config}[kw.pop("family", "qwen2")]
    cfg = config_class(**kw, max_position_embeddings=32768, attn_implementation="sdpa")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model


def save_random_model(shape, path, tok_vocab=None):
    """A loadable HF dir (random weights + a byte-level BPE tokenizer with a chat template)."""
    from runs.tinymodels import build_tokenizer  # the tokenizer builder the tests and the tiny world use
    tok = build_tokenizer(path, vocab_size=min(SHAPES[shape]["vocab_size"], 300))
    model = random_model(shape, torch.bfloat16, "cpu")
    model.resize_token_embeddings(max(len(tok), SHAPES[shape]["vocab_size"]))
    model.generation_config.eos_token_id = [tok.eos_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def n_params(model, exclude_embedding=True):
    n = sum(p.numel() for p in model.parameters())
    if exclude_embedding:
        n -= model.get_input_embeddings().weight.numel()
    return n


def peak_flops(device):
    """Dense bf16 peak of the GPU (datasheet), for MFU."""
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "cpu"
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12)):
        if key in name:
            return name, flops
    return name, float("nan")
