"""The vLLM side of `rollout.backend=vllm`: a vLLM engine serving one policy, run in its own environment
(`make vllm` -> .venv-vllm: vLLM pins a transformers older than ours, so it cannot share our venv). So this
file imports only the standard library, torch, safetensors and vllm, never llm_stages.

    .venv-vllm/bin/python llm_stages/rollout/vllm_server.py --model <HF checkpoint dir> --address <socket path | host:port>

`llm_stages.rollout.vllm_client.VLLMServer` starts it (or attaches to one by address). The protocol is
`multiprocessing.connection` (pickled dicts, authenticated with the key in $LLM_STAGES_VLLM_AUTHKEY, hex):
each request {"op": ..., ...} gets {"ok": True, "result": ...} or {"ok": False, "error": <traceback>}.

- generate: {"prompts": [[token ids]], "max_tokens", "temperature" (0: greedy), "top_p", "top_k",
  "stop_token_ids", "seed"} -> [(reply token ids, the log-prob of each)], reply i seeded by seed + i.
  Log-probs are vLLM's `processed_logprobs`: of the distribution sampled from (logits / temperature).
- load_weights: {"path": <safetensors file of HF-named tensors>} -> loaded into the running engine
  (vLLM's in-place reload through the model's `load_weights`), prefix cache reset;
  -> the checksum (count, sum, sum of squares in float64) of the tensors read, to compare with those sent.
- checksum -> the same over the engine's parameters (on CPU they are kept beside the kernels' packed copies).
- score: {"sequences": [[token ids]]} -> each token's teacher-forced log-prob under the engine's weights.
- info, shutdown.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so this process is the only one to
clean up; the client starts it in its own process group, set to die with its parent.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback


def checksum(tensors) -> dict:
    """Element count, sum and sum of squares (float64) of `tensors`: the same on both sides of a transfer."""
    count, total, squares = 0, 0.0, 0.0
    for tensor in tensors:
        x = tensor.detach().double()
        count, total, squares = count + x.numel(), total + float(x.sum()), squares + float((x * x).sum())
    return {"count": count, "sum": total, "sum_sq": squares}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF checkpoint directory (config, weights, tokenizer)")
    parser.add_argument("--address", required=True, help="unix socket path, or host:port")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enforce-eager", action="store_true")
    return parser.parse_args(argv)


def address_of(text: str):
    if ":" in text and not text.startswith("/"):
        host, port = text.rsplit(":", 1)
        return (host, int(port)), "AF_INET"
    return text, "AF_UNIX"


def keep_cpu_weights() -> None:
    """vLLM on CPU packs each linear layer's weight for its GEMM kernel and drops the parameter, so new
    weights would have nowhere to go: keep the parameters (the packed copy is made from them again after
    each load, `repack_cpu_kernels`). Costs a second copy of the linear weights, on CPU only."""
    import vllm.model_executor.layers.utils as layer_utils

    pack = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(pack, "keeps_weight", False):
        return

    def pack_keeping_weight(layer, remove_weight: bool) -> None:
        pack(layer, remove_weight=False)

    pack_keeping_weight.keeps_weight = True
    layer_utils.dispatch_cpu_unquantized_gemm = pack_keeping_weight


def repack_cpu_kernels(model) -> None:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)):
            method.process_weights_after_loading(module)


class Server:
    def __init__(self, args):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        from vllm.platforms import current_platform

        self.cpu = current_platform.is_cpu()
        if self.cpu:
            keep_cpu_weights()

        self.llm = LLM(model=args.model, tokenizer=args.model, dtype=args.dtype, seed=args.seed,
                       max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                       enforce_eager=args.enforce_eager, logprobs_mode="processed_logprobs",
                       enable_prefix_caching=True,
                       generation_config="vllm")  # no sampling defaults from the checkpoint's generation_config.json

    def model_call(self, fn):
        """fn(model) on the engine's model (in this process: one worker)."""
        return self.llm.apply_model(fn)[0]

    def op_info(self):
        import torch
        import vllm

        return {"vllm": vllm.__version__, "torch": torch.__version__, "pid": os.getpid()}

    def op_generate(self, prompts, max_tokens, temperature, top_p=1.0, top_k=0, stop_token_ids=(), seed=0):
        from vllm import SamplingParams

        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p or 1.0,
                                 top_k=top_k if top_k and top_k > 0 else -1,  # -1: off
                                 stop_token_ids=list(stop_token_ids), seed=seed + i, logprobs=0,
                                 skip_special_tokens=False, detokenize=False)
                  for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        replies = []
        for output in outputs:
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            logprobs = [float(step[token].logprob) for token, step in zip(ids, completion.logprobs or [])]
            replies.append((ids, logprobs))
        return replies

    def op_load_weights(self, path):
        """The tensors of `path` (HF names) into the running engine's parameters with the model's own
        `load_weights` (which fuses q/k/v and gate/up), as TRL's vllm_serve does; on CPU each linear and
        embedding layer then repacks its kernel weights from them. Returns the checksum of what was read,
        for the client to compare with what it sent."""
        from safetensors.torch import load_file

        tensors = load_file(path)
        cpu = self.cpu

        def load(model):
            model.load_weights(weights=iter(tensors.items()))
            if cpu:
                repack_cpu_kernels(model)

        self.model_call(load)
        self.llm.reset_prefix_cache()  # cached KV of the old weights must not serve the new ones
        return checksum(tensors.values())

    def op_checksum(self):
        """The checksum of the engine's own parameters (q/k/v and gate/up fused: the sums do not change)."""
        return self.model_call(lambda model: checksum(p for _, p in model.named_parameters()))

    def op_score(self, sequences):
        """Teacher-forced log-prob of each token after the first of each sequence, under the engine's
        weights (temperature 1): the test compares them with the policy's."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], params, use_tqdm=False)
        return [[float(step[token].logprob) for token, step in zip(seq[1:], out.prompt_logprobs[1:])]
                for seq, out in zip(sequences, outputs)]

    def serve(self, address: str, authkey: bytes) -> None:
        from multiprocessing.connection import Listener

        where, family = address_of(address)
        with Listener(where, family=family, authkey=authkey) as listener:
            print(f"llm_stages vllm_server ready on {address} (pid {os.getpid()})", flush=True)
            while True:
                with listener.accept() as conn:
                    if not self.handle(conn):
                        return

    def handle(self, conn) -> bool:
        """Requests of one connection until it closes (True: accept the next) or asks to shut down (False)."""
        while True:
            try:
                request = conn.recv()
            except (EOFError, ConnectionResetError):
                return True
            op = request.pop("op", None)
            if op == "shutdown":
                conn.send({"ok": True, "result": None})
                return False
            started = time.perf_counter()
            try:
                result = getattr(self, f"op_{op}")(**request)
                reply = {"ok": True, "result": result, "seconds": time.perf_counter() - started}
            except Exception:  # noqa: BLE001 - sent to the client, which raises it there
                reply = {"ok": False, "error": traceback.format_exc()}
            conn.send(reply)


def main(argv=None) -> int:
    args = parse_args(argv)
    key = os.environ.get("LLM_STAGES_VLLM_AUTHKEY")
    if not key:
        print("LLM_STAGES_VLLM_AUTHKEY (hex) must be set", file=sys.stderr)
        return 2
    Server(args).serve(args.address, bytes.fromhex(key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
