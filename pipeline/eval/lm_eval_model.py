"""An lm-evaluation-harness model for any model this recipe produces.

Importing this module registers the model name ``mobilemoe`` with lm-eval, so both
``lm_eval.simple_evaluate(model="mobilemoe", model_args=...)`` and the command line
(``mobilemoe-lm-eval run --model mobilemoe ...``, see ``pipeline/eval/lm_eval_cli.py``)
can use it. Model arguments:

  model       a checkpoint directory (a stage's ``model/``) or QAT's converted
              ``model.safetensors`` (INT4)
  tokenizer   the recipe's ``tokenizer.json``
  program     optional ``.pte``: generation runs in the ExecuTorch runtime instead
  batch_size  sequences per forward pass

Every request goes through this recipe's own harness (:class:`TorchLM`), so a task
scored here and by ``pipeline.eval`` sees the same tokens and the same numbers.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from pipeline.data.tokenizer import Tokenizer
from pipeline.eval.harness import GenerationRequest, ProgramLM, TorchLM
from pipeline.eval.models import load_model

NAME = "mobilemoe"


@register_model(NAME)
class RecipeLM(LM):
    def __init__(
        self,
        model: str,
        tokenizer: str,
        program: str | None = None,
        batch_size: int | str = 32,
        max_gen_toks: int | str = 256,
        **_ignored,  # lm-eval passes device/max_batch_size to every model; CPU only here
    ) -> None:
        super().__init__()
        tok = Tokenizer.load(tokenizer)
        self.scorer = TorchLM(load_model(model)[0], tok, int(batch_size) if str(batch_size).isdigit() else 32)
        self.generator = ProgramLM(program, tok) if program else self.scorer
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([tuple(r.args) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests) -> list[str]:
        asks = []
        for context, kwargs in (r.args for r in requests):
            until = kwargs.get("until") or ["\n\n"]
            until = [until] if isinstance(until, str) else list(until)
            asks.append(GenerationRequest(context, tuple(until), int(kwargs.get("max_gen_toks", self.max_gen_toks))))
        return self.generator.generate_until(asks)
