"""Run many mergekit recipes in one mergekit process (run_corpus.py starts it with
mergekit's own Python): ``mk_driver.py JOBS.json RESULTS.json LORA_CACHE``. Each job is
``[name, yaml_path, out_dir]``; each result is the exit status and the last error line.
One process saves mergekit's start-up (torch, transformers) per recipe."""

import json
import sys
import traceback

import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

jobs = json.load(open(sys.argv[1]))
results = {}
for name, cfg_path, out in jobs:
    try:
        config = MergeConfiguration.model_validate(yaml.safe_load(open(cfg_path)))
        run_merge(config, out, MergeOptions(copy_tokenizer=True, random_seed=0, quiet=True,
                                             lora_merge_cache=sys.argv[3]))
        results[name] = {"rc": 0}
    except BaseException as e:  # noqa: BLE001 - every failure is a result
        line = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        results[name] = {"rc": 1, "error": f"{type(e).__name__}: {line}"[:300],
                         "where": traceback.extract_tb(e.__traceback__)[-1].name if e.__traceback__ else ""}
    json.dump(results, open(sys.argv[2], "w"), indent=1)
    print(name, results[name].get("error", "ok"), flush=True)
