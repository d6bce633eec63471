"""Evaluation in one place: fidelity to the unquantized teacher, lm-eval benchmarks, instruction checks.

* :mod:`.fidelity`: teacher-forced top-1 agreement, KL and JSD on held-out chat prompts, the one
  fidelity run (:func:`measure_fidelity`) that ``upq quantize``, ``upq eval``, the demo and the
  benchmarks use;
* :mod:`.topicality`: whether free-running answers are on their prompt's subject, judged by the teacher;
* :mod:`.harness`: the lm-evaluation-harness glue (version gate, task lookup, building tasks);
* :mod:`.local_tasks`: lm-eval's MMLU and IFEval from local files in their own row formats;
* :mod:`.runner`: ``upq eval`` (:func:`evaluate_model`), results JSON and the summary table;
* :mod:`.instructions`: a small offline instruction-following check.

lm-eval is imported only inside functions: importing this package never needs it.
"""

from .fidelity import (FidelityReference, answer_texts, decode_answers, fidelity, held_out_prompts, measure_fidelity,
                       report_metrics, token_divergences)
from .harness import EvalSetupError
from .instructions import INSTRUCTION_CHECKS, instruction_following
from .runner import evaluate_model, summary_table
from .topicality import topicality

__all__ = ["FidelityReference", "answer_texts", "decode_answers", "fidelity", "held_out_prompts", "measure_fidelity",
           "report_metrics", "token_divergences",
           "EvalSetupError", "INSTRUCTION_CHECKS", "instruction_following", "evaluate_model", "summary_table",
           "topicality"]
