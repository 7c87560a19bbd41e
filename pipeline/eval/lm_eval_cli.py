"""``mobilemoe-lm-eval``: lm-eval's own command line, with this recipe's model registered.

lm-eval's CLI only knows models registered before it parses its arguments, so this
entry point imports the adapter first, e.g.::

    mobilemoe-lm-eval run --model mobilemoe \
        --model_args model=outputs/sft/model,tokenizer=data/mix/tokenizer/tokenizer.json \
        --include_path conf/lm_eval --tasks mobilemoe_continuation
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import pipeline.eval.lm_eval_model  # noqa: F401 - registers the model

    cli_evaluate()


if __name__ == "__main__":
    main()
