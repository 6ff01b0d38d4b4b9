"""Dense-task evaluations as library functions: each task module has a config dataclass and an
``evaluate_<task>(config, variants, ...)`` returning `report.TaskResults`; `report.write_results` writes them.
No argument parsing or printing here: ``featlift eval <task>`` is a thin layer over these functions."""
