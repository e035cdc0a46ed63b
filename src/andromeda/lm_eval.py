"""lm-evaluation-harness integration: `AndromedaLM`, registered as the harness model "andromeda"
(importing this module registers it), `run_lm_eval` and `format_table`. Needs the `eval` extra:
`pip install -e '.[eval]'` in the andromeda checkout. Defined in `andromeda.interop.lm_eval`."""

from .interop.lm_eval import AndromedaLM, format_table, run_lm_eval

__all__ = ["AndromedaLM", "format_table", "run_lm_eval"]
