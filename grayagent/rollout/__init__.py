"""Progressive rollout: ramp a canary's split weight step by step, judge it by its traffic, roll back on failure.

- `traffic`: per-upstream request, 5xx and latency counters that agents build from the gateway itself;
- `sources`: where the controller reads those figures (the fleet's status entries, or Prometheus);
- `analysis`: the window math and the verdict;
- `document`: rewriting one service's split weights in a rule document, and nothing else;
- `record`: the rollout record (RolloutRecord) and its JSON;
- `usecases`: `grayagent rollout start|status|pause|resume|promote|abort`;
- `controller`: the long-running controller's tick, built from `leadership` (who may act), `judging`
  (running the analysis), `steps` (the step state machine) and `publishing` (steps and rollbacks);
- `service`: `grayagent rollout run` as a service.
"""
