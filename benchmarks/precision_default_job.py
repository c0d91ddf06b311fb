"""The default job's first three steps in fp32 and in bf16 autocast, one after the other in one process:
what --precision costs on this CPU (prints total seconds, tokens/s and time_s per step).

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/precision_default_job.py
"""
import tempfile, time, json, sys
import orpo
for prec in ("fp32", "bf16"):
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        orpo.train(orpo.TrainConfig(output_dir=d + "/run", max_steps=3, save_steps=0, eval_samples=0, precision=prec))
        rows = [json.loads(l) for l in open(d + "/run/metrics.jsonl")]
        tr = [r for r in rows if "loss" in r]
        print("RESULT", prec, "total", round(time.perf_counter() - t, 1), "tok/s", [round(r.get("tokens_per_s", 0)) for r in tr],
              "time_s", [round(r["time_s"], 1) for r in tr], flush=True)
