"""The CUDA half of scripts/gpu_check.sh: `epee bench` on cuda and a TorchServe round trip on a GPU worker.

Run through the shell script (it checks for CUDA first). Everything happens in a temporary directory; the server
listens on 127.0.0.1 free ports and is stopped at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import requests  # noqa: E402
import torch  # noqa: E402
from helpers import build_tiny_model  # noqa: E402  (tests/helpers.py: the one tiny-model builder)
from integration.helpers import derive_config, package, write_model_yaml  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from epee_core.cli import main  # noqa: E402
from epee_core.engine.backbones import minilm_path  # noqa: E402
from epee_core.engine.inputs import encode_texts  # noqa: E402
from epee_core.engine.model import EarlyExitModel  # noqa: E402
from epee_core.engine.runner import run_early_exit  # noqa: E402
from epee_core.ops.management import ManagementClient  # noqa: E402
from epee_core.ops.torchserve import TorchServe  # noqa: E402
from epee_core.serving.config import ServeConfig  # noqa: E402

DEMO_DEV = ROOT / "epee_core" / "data" / "ade_demo_dev.jsonl"
TEXT = "Severe rash after amoxicillin."


def check(condition: bool, message: str) -> None:
    print(("ok   " if condition else "FAIL ") + message, flush=True)
    if not condition:
        raise SystemExit(1)


def main_check(force_cpu: bool) -> None:
    device = "cpu" if force_cpu else "cuda:0"
    dtype = "float32" if force_cpu else "float16"
    with tempfile.TemporaryDirectory(prefix="epee-gpu-check-") as tmp:
        work = Path(tmp)
        model_dir = work / "tiny-text-model"
        tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
        build_tiny_model(tokenizer).save_pretrained(model_dir)

        data = work / "bench.jsonl"  # the demo sentences, labelled with the tiny model's labels
        sentences = [json.loads(line)["text"] for line in DEMO_DEV.read_text().splitlines() if line.strip()]
        labels = EarlyExitModel.from_pretrained(model_dir).spec.labels
        data.write_text("".join(json.dumps({"text": text, "label": labels[number % len(labels)]}) + "\n"
                                for number, text in enumerate(sentences[:64])))  # fmt: skip
        for bench_dtype in ("float32", dtype):
            output = io.StringIO()
            with contextlib.redirect_stdout(output):
                code = main(["bench", "--model", str(model_dir), "--data", str(data), "--device", device,
                             "--dtype", bench_dtype, "--policies", "full,epee", "--batch-sizes", "1,8",
                             "--max-samples", "64", "--output-dir", str(work / "bench"), "--json"])  # fmt: skip
            check(code == 0, f"epee bench --device {device} --dtype {bench_dtype}")
            report = json.loads(output.getvalue())
            check(report["device"] == device and report["dtype"] == bench_dtype, "the bench ran where asked")
            for row in report["results"]:
                print(f"     batch {row['batch_size']:2d} {row['policy']:5s} {row['samples_per_second']:9.1f} samples/s, "
                      f"average exit layer {row['avg_exit_layer']}")  # fmt: skip

        config = write_model_yaml(work / "gpu.yaml", batch_size=4, max_batch_delay=50,
                                  task="text-classification", policy="epee", dtype=dtype)  # fmt: skip
        store = work / "model_store"
        package(model_dir, config, "gpu-check", store)
        properties = derive_config(work / "config.properties", store)
        with properties.open("a") as extra:
            extra.write(f"number_of_gpu={0 if force_cpu else 1}\n")
        server = TorchServe(properties, workdir=work)
        server.start()
        try:
            ManagementClient(server.management_url, server.keys["management"], timeout=300).register(
                "gpu-check.mar", name="gpu-check"
            )
            plain = requests.post(f"{server.inference_url}/predictions/gpu-check", json={"text": TEXT},
                                  headers=server.auth(), timeout=120)  # fmt: skip
            body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": [TEXT, TEXT]}]}
            oip = requests.post(f"{server.inference_url}/v2/models/gpu-check/infer", json=body,
                                headers=server.auth(), timeout=120)  # fmt: skip
            time.sleep(1)  # the worker's log reaches the file a moment later
            log = (server.log_dir / "model_log.log").read_text(errors="replace")
        finally:
            server.stop()
        check(plain.status_code == 200, f"plain request answered 200 ({plain.status_code})")
        check(oip.status_code == 200, f"OIP request answered 200 ({oip.status_code})")
        placed = f"device {device}, dtype {dtype}"
        check(placed in log, f"the worker logged '{placed}'")

        model = EarlyExitModel.from_pretrained(model_dir, device=device, dtype=getattr(torch, dtype))
        inputs = {k: v.to(model.device) for k, v in encode_texts(tokenizer, [TEXT], 64).items()}
        result = run_early_exit(model, inputs, ServeConfig.load(config).policy)
        label = model.spec.labels[int(result.probs[0].argmax())]
        answer = plain.json()
        check((answer["label"], answer["exit_layer"]) == (label, int(result.exit_layer[0])),
              f"the server's answer equals the in-process engine on {device} ({label}, layer {answer['exit_layer']})")  # fmt: skip
        outputs = {output["name"]: output["data"] for output in oip.json()["outputs"]}
        check(outputs["label"] == [label, label], "the OIP answer's rows equal it too")
        print(json.dumps({"device": device, "dtype": dtype, "gpu": torch.cuda.get_device_name(0)
                          if torch.cuda.is_available() else None}))  # fmt: skip


if __name__ == "__main__":
    main_check(force_cpu="--force-cpu" in sys.argv[1:])
