"""Peak memory and time of one training step's loss + backward with the full logits and with the
chunked LM head (llm_stages.losses.chunked), on a small Qwen2 with a large vocabulary at a long
sequence; each setting in its own process (peak RSS on CPU, torch's peak allocated on CUDA).

    python -m bench.lm_head_memory                       # vocab 50k, seq 1024, batch 4, CPU
    python -m bench.lm_head_memory --vocab 151936 --seq 2048 --batch 8 --device cuda

Settings: `full` (model.chunked_lm_head=false), `chunked` (the custom autograd head),
`checkpointed` (the same chunks under torch.utils.checkpoint, as the distill head does; for
comparison only), each also with activation checkpointing (`+ckpt`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SETTINGS = ["full", "chunked", "checkpointed", "full+ckpt", "chunked+ckpt"]


def run(setting: str, args) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llm_stages.losses import chunked as chunked_module
    from llm_stages.losses.causal import labelled_outputs, token_cross_entropy

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.seq, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).to(args.device)
    if setting.endswith("+ckpt"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if not setting.startswith("full"):
        setattr(model, chunked_module.CHUNK_ATTRIBUTE, args.chunk)
    if setting == "checkpointed":
        def per_chunk(hidden, head, labels, *, chunk_size, temperature=1.0, softcap=None, with_entropy=False):
            def piece(h, y):
                return chunked_module.logits_scores(F.linear(h, head.weight), y).logps
            parts = [checkpoint(piece, hidden[i:i + chunk_size], labels[i:i + chunk_size], use_reentrant=False)
                     for i in range(0, hidden.shape[0], chunk_size)]
            logps = torch.cat(parts)
            return chunked_module.TokenScores(logps, torch.zeros_like(logps), None)
        chunked_module.token_logprobs = per_chunk
    model.train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    labels = ids.clone()
    labels[:, : args.seq // 8] = -100  # a prompt
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        outputs, kept = labelled_outputs(model, labels, input_ids=ids)
        loss_sum, n = token_cross_entropy(outputs, kept)
        (loss_sum / n).backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    out = {"setting": setting, "loss": float(loss_sum / n), "step_s": min(times),
           "base_rss_mb": round(base_rss), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if args.device == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=50_000)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.child, args)))
        return
    passed = [f"--{key}={value}" for key, value in vars(args).items() if key not in ("settings", "child")]
    print(f"vocab {args.vocab}, seq {args.seq}, batch {args.batch}, hidden {args.hidden}, layers {args.layers}, "
          f"chunk {args.chunk}, {args.device}")
    for setting in args.settings.split(","):
        done = subprocess.run([sys.executable, "-m", "bench.lm_head_memory", *passed, "--child", setting],
                              capture_output=True, text=True)
        if done.returncode:
            print(f"{setting}: failed\n{done.stderr[-2000:]}")
            continue
        print(json.loads(done.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
