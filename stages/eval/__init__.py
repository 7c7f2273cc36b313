"""Evaluation stage: GLM-130B's task framework (`python -m stages.eval`).

Task YAMLs (stages/eval/tasks/) name a data file and a task type; `run(EvalConfig)` scores an
inference checkpoint on them (multiple choice, generation, language modelling) and writes a
JSON report, logging `<task>/<metric>` and `<group>/<metric>` to MLflow.
"""
