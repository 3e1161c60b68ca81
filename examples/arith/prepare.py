"""Build the quick-start world from nothing: a character tokenizer, a tiny random Qwen3-MoE, and a
synthetic arithmetic task with verifiable answers.

    python examples/arith/prepare.py --out runs/arith

writes ``OUT/model`` (an HF directory: config.json, model.safetensors, tokenizer files with a chat
template), ``OUT/train.jsonl`` and ``OUT/eval.jsonl`` (``{"prompt": "12+7=?", "label": "19"}``) and
``OUT/sft.jsonl`` (the same prompts with their answers, for the SFT warm-up).
Everything is seeded: the same flags give the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"]
CHARS = list("0123456789+-*=? ")
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(out: Path) -> int:
    """A character-level tokenizer (digits, operators) saved as a ``transformers`` fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return len(vocab)


def model_config(vocab_size: int, hidden: int, layers: int, experts: int) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "moe_intermediate_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "num_experts": experts,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": 128,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "bos_token_id": SPECIALS.index("<bos>"),
        "eos_token_id": SPECIALS.index("<eos>"),
        "pad_token_id": SPECIALS.index("<pad>"),
    }


def make_problems(n: int, max_operand: int, rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"prompt": f"{a}+{b}=?", "label": str(a + b)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/arith")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-eval", type=int, default=200)
    p.add_argument("--num-sft", type=int, default=2000)
    p.add_argument("--max-operand", type=int, default=19)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from miles.models.loading import build_model, save_hf
    from miles.models.spec import ModelSpec

    out = Path(args.out)
    model_dir = out / "model"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    tok_dir = out / "tokenizer.tmp"
    vocab = build_tokenizer(tok_dir)
    spec = ModelSpec.from_hf_config(model_config(vocab, args.hidden_size, args.num_layers, args.num_experts))
    save_hf(build_model(spec), model_dir, tokenizer_source=None)
    for f in tok_dir.iterdir():
        f.replace(model_dir / f.name)
    tok_dir.rmdir()
    rng = random.Random(args.seed)
    write_jsonl(out / "train.jsonl", make_problems(args.num_train, args.max_operand, rng))
    write_jsonl(out / "eval.jsonl", make_problems(args.num_eval, args.max_operand, rng))
    sft = make_problems(args.num_sft, args.max_operand, rng)
    write_jsonl(
        out / "sft.jsonl", [{"prompt": r["prompt"], "response": r["label"], "label": r["label"]} for r in sft]
    )
    params = sum(t.numel() for t in build_model(spec).parameters())
    print(
        f"wrote {model_dir} ({params / 1e6:.2f}M parameters, vocab {vocab}) and {out}/{{train,eval,sft}}.jsonl"
    )


if __name__ == "__main__":
    main()
