"""Our side of `rollout.backend=vllm`: `VLLMServer` starts llm_stages/rollout/vllm_server.py in the vLLM environment
(.venv-vllm, `make vllm`), or attaches to a running one by address, and talks to it (multiprocessing.connection,
an authkey); `VLLMSampler` draws the RL stages' replies from it and sends it the policy's weights whenever
they changed (after an optimiser step), before the next rollout.

No orphaned server: it runs in its own process group, with PR_SET_PDEATHSIG (it is killed when the process
that started it dies, also by SIGKILL or an unhandled SIGTERM), and `close()` (the stage's teardown, atexit,
a garbage-collection finaliser) asks it to shut down, then kills its group.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from multiprocessing.connection import Client
from pathlib import Path

import torch

from llm_stages.checks import vllm_python
from llm_stages.errors import ConfigError
from llm_stages.rollout.sampling import Sample, Sampler, finish_sample
from llm_stages.rollout.vllm_server import address_of, checksum

log = logging.getLogger(__name__)

SERVER_SCRIPT = Path(__file__).with_name("vllm_server.py")
SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def _dying_with(parent: int):
    def preexec() -> None:  # runs in the child between fork and exec
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


def scratch_dir(kind: str) -> Path:
    """A fresh folder in shared memory named after this process; those of processes gone (killed before
    they could clean up) are removed on the way."""
    for stale in SHM.glob("llm_stages_vllm_*"):
        try:
            pid = int(stale.name.split("_")[3])
            os.kill(pid, 0)
        except (IndexError, ValueError):
            continue
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass
    return Path(tempfile.mkdtemp(prefix=f"llm_stages_vllm_{os.getpid()}_{kind}_", dir=SHM))


class VLLMServer:
    """A vLLM server process serving `model_dir` (started here), or the one at `address` (attached).
    `authkey` (hex): the server's key; a started server gets a fresh one."""

    def __init__(self, model_dir: str | None = None, *, python: str | None = None, address: str | None = None,
                 authkey: str | None = None, dtype: str = "auto", max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.3, kv_cache_gb: float = 1.0, startup_timeout: float = 300.0,
                 seed: int = 0, env: dict | None = None):
        self.process, self.conn, self.workdir = None, None, scratch_dir("server")
        self._finalizer = weakref.finalize(self, _cleanup, self.__dict__)
        atexit.register(self.close)
        if address:
            self.address, self.authkey = address, bytes.fromhex(authkey or os.environ.get("LLM_STAGES_VLLM_AUTHKEY", ""))
            self.conn = self._connect(startup_timeout)
            return
        python_path = vllm_python(python)
        self.address, self.authkey = str(self.workdir / "server.sock"), secrets.token_bytes(16)
        command = [str(python_path), str(SERVER_SCRIPT), "--model", str(model_dir), "--address", self.address,
                   "--dtype", dtype, "--gpu-memory-utilization", str(gpu_memory_utilization), "--seed", str(seed)]
        if max_model_len:
            command += ["--max-model-len", str(max_model_len)]
        child_env = {**os.environ, "LLM_STAGES_VLLM_AUTHKEY": self.authkey.hex(),
                     "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gb))), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                     "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        child_env.pop("PYTHONPATH", None)  # our packages must not shadow the vLLM environment's
        self.log_path = self.workdir / "server.log"
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=child_env,
                                            start_new_session=True, preexec_fn=_dying_with(os.getpid()))
        log.info("vLLM server starting (pid %d, log %s)", self.process.pid, self.log_path)
        self.conn = self._connect(startup_timeout)
        log.info("vLLM server ready: %s", self.call("info"))

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def _connect(self, timeout: float):
        where, family = address_of(self.address)
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                why = f"the vLLM server exited with code {self.process.returncode} while starting:\n{self.log_tail()}"
                self.close()
                raise RuntimeError(why)
            try:
                return Client(where, family=family, authkey=self.authkey)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    self.close()
                    raise TimeoutError(f"no vLLM server at {self.address} after {timeout:.0f} s") from None
                time.sleep(0.2)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (AttributeError, OSError):
            return ""

    def call(self, op: str, **kwargs):
        if self.conn is None:
            raise RuntimeError("the vLLM server is closed")
        try:
            self.conn.send({"op": op, **kwargs})
            reply = self.conn.recv()
        except (EOFError, OSError) as e:
            raise RuntimeError(f"lost the vLLM server ({e}):\n{self.log_tail()}") from None
        if not reply["ok"]:
            raise RuntimeError(f"vLLM server, {op}: {reply['error']}")
        return reply["result"]

    def generate(self, prompts: list[list[int]], **params) -> list[tuple[list[int], list[float]]]:
        return self.call("generate", prompts=prompts, **params)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> dict:
        """The policy's (HF-named) weights into the running engine, through a safetensors file in shared memory.
        Raises if the checksum of what the server read differs from that of what was sent; returns it."""
        from safetensors.torch import save_file

        seen, unique = set(), {}
        for name, tensor in state.items():  # tied weights once (safetensors refuses shared storage)
            key = (tensor.data_ptr(), tensor.shape)
            if key not in seen:
                seen.add(key)
                unique[name] = tensor.detach().to("cpu").contiguous()
        path = self.workdir / "weights.safetensors"
        save_file(unique, str(path))
        try:
            received = self.call("load_weights", path=str(path))
        finally:
            path.unlink(missing_ok=True)
        sent = checksum(unique.values())
        if received["count"] != sent["count"] or any(abs(received[k] - sent[k]) > 1e-9 * max(1.0, abs(sent[k]))
                                                     for k in ("sum", "sum_sq")):
            raise RuntimeError(f"weight sync: the vLLM server read {received}, we sent {sent}")
        return received

    def checksum(self) -> dict:
        """{count, sum, sum_sq} of the engine's parameters (see vllm_server.checksum)."""
        return self.call("checksum")

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs of each sequence's tokens after the first, under the server's weights."""
        return self.call("score", sequences=sequences)

    def close(self) -> None:
        _cleanup(self.__dict__)
        atexit.unregister(self.close)


def _cleanup(state: dict) -> None:
    """Shut the server down (politely, then its whole process group), remove the scratch folder."""
    conn, process = state.get("conn"), state.get("process")
    state["conn"] = state["process"] = None
    if conn is not None:
        try:
            if process is not None:
                conn.send({"op": "shutdown"})
                conn.poll(5) and conn.recv()
            conn.close()
        except (OSError, EOFError):
            pass
    if process is not None:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)  # also whatever it started
            except (ProcessLookupError, PermissionError):
                break
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                continue
    workdir = state.get("workdir")
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


class VLLMSampler(Sampler):
    """The RL stages' replies drawn by a vLLM server (`rollout.backend=vllm`, settings `rollout.vllm`): the
    same `Sample` as the HF sampler, with vLLM's log-prob of each sampled token (at the sampling temperature).
    The server starts on first use from the initial policy (saved to shared memory; LoRA merged), and is
    sent the policy's weights before a rollout whenever the policy took an optimiser step since the last.

    `settings`: python (the vLLM venv's interpreter, default .venv-vllm/bin/python), address + authkey (attach
    to a running server instead), dtype (default: the policy's), max_model_len, kv_cache_gb (CPU),
    gpu_memory_utilization, startup_timeout, importance_sampling (a mode of IMPORTANCE_SAMPLING_MODES or null)
    and importance_sampling_cap (TRL's truncated importance sampling, see losses.rl.importance_weights)."""

    def __init__(self, model, tokenizer, generation: dict, val_generation: dict | None = None, *, settings: dict):
        super().__init__(model, tokenizer, generation, val_generation)
        known = {"python", "address", "authkey", "dtype", "max_model_len", "kv_cache_gb", "gpu_memory_utilization",
                 "startup_timeout", "importance_sampling", "importance_sampling_cap"}
        if set(settings) - known:
            raise ConfigError(f"rollout.vllm.{sorted(set(settings) - known)[0]}: unknown; known: {', '.join(sorted(known))}")
        mode = settings.get("importance_sampling", "token_truncate")
        if mode not in (*IMPORTANCE_SAMPLING_MODES, None):
            raise ConfigError(f"rollout.vllm.importance_sampling={mode!r}: use one of {', '.join(IMPORTANCE_SAMPLING_MODES)} "
                              "or null (no correction)")
        cap = float(settings.get("importance_sampling_cap") or 2.0)
        self.importance_sampling = (mode, cap) if mode else None
        if not settings.get("address"):
            vllm_python(settings.get("python"))  # a missing environment fails now, in one line
        self.settings, self.server, self.synced_version, self.model_dir = dict(settings), None, None, None
        self.sync_seconds = 0.0

    def start(self, model) -> VLLMServer:
        from llm_stages.adapters import exportable

        settings = self.settings
        if settings.get("address"):
            return VLLMServer(address=settings["address"], authkey=settings.get("authkey"),
                              startup_timeout=float(settings.get("startup_timeout") or 300))
        self.model_dir = scratch_dir("policy")
        exportable(model, merge_lora=True).save_pretrained(self.model_dir)
        self.tokenizer.save_pretrained(self.model_dir)
        dtype = settings.get("dtype") or str(next(model.parameters()).dtype).removeprefix("torch.")
        return VLLMServer(self.model_dir, python=settings.get("python"), dtype=dtype,
                          max_model_len=settings.get("max_model_len"), kv_cache_gb=float(settings.get("kv_cache_gb") or 1),
                          gpu_memory_utilization=float(settings.get("gpu_memory_utilization") or 0.3),
                          startup_timeout=float(settings.get("startup_timeout") or 300))

    def sync(self, model, version: int | None) -> None:
        if self.server is None:
            self.server = self.start(model)
        if version is not None and version == self.synced_version:
            return
        from llm_stages.adapters import exportable

        started = time.perf_counter()
        self.server.load_state_dict(exportable(model, merge_lora=True).state_dict())
        self.synced_version, self.sync_seconds = version, time.perf_counter() - started

    @torch.no_grad()
    def sample(self, model, prompts, *, repeats: int = 1, generation: dict, seed: int) -> Sample:
        if self.server is None:
            self.sync(model, None)
        query = prompts.input_ids.repeat_interleave(repeats, 0)
        query_mask = prompts.attention_mask.repeat_interleave(repeats, 0)
        sampling = generation.get("do_sample", True)
        replies = self.server.generate(
            [q[m.bool()].tolist() for q, m in zip(query, query_mask)], max_tokens=int(generation["max_new_tokens"]),
            temperature=float(generation.get("temperature") or 1.0) if sampling else 0.0,
            top_p=float(generation.get("top_p") or 1.0) if sampling else 1.0,
            top_k=int(generation.get("top_k") or 0) if sampling else 0, stop_token_ids=self.eos_ids, seed=seed)
        width = max(1, max(len(ids) for ids, _ in replies))
        pad_id = self.tokenizer.pad_token_id
        response = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in replies], device=query.device)
        logprobs = torch.tensor([lps + [0.0] * (width - len(lps)) for _, lps in replies], device=query.device)
        return finish_sample(query, query_mask, [response], [logprobs], self.eos_ids, pad_id)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.server, self.synced_version = None, None
        if self.model_dir is not None:
            shutil.rmtree(self.model_dir, ignore_errors=True)
            self.model_dir = None
