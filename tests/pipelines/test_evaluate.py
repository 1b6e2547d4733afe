"""The evaluation report's table."""
from pipelines.evaluate import format_table


def test_format_table_without_timing():
    """`speed_prompts=0` times nothing: the speed columns say so instead of failing."""
    table = format_table({"accuracy": {"rag": {"memory_only": 0.5, "memory_only_answer_logprob": -1.0}}, "speed": {}})
    assert table.splitlines()[-1] == "| rag | 0.500 | – | – |"
