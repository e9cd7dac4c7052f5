"""Progressive rollout: ramp a canary's split weight step by step, judge it by its traffic, roll back on failure.

- `sources`: where the controller reads traffic figures: the snapshots agents put in the fleet's status entries
  (counted by each target's sampler, grayagent/targets/traffic.py), or Prometheus;
- `analysis`: the window math and the verdict;
- `document`: rewriting one service's split weights in a rule document, and nothing else;
- `record`: the rollout record (RolloutRecord) and its JSON;
- `usecases`: `grayagent rollout start|status|pause|resume|promote|abort`;
- `controller`: the long-running controller's tick, built from `leadership` (who may act), `judging`
  (running the analysis), `steps` (the step state machine) and `publishing` (steps and rollbacks);
- `service`: `grayagent rollout run` as a service.
"""
