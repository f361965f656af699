"""Environment wiring: deployments and schedules, local stack scripts, cluster specs.

Nothing here is imported by the flows; it configures where they run.
"""
