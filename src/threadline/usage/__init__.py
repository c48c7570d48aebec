"""Token usage of runs, plan quotas, and the meter that stops a run at its token budget."""
