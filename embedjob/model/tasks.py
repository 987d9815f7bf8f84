"""The task table, once: jina-embeddings-v3's task names, their PEFT adapters, instruction
prefixes and Matryoshka dims, and which task embeds the queries for a table of each task.

Task names map to adapters here and nowhere else; an unknown task is refused by
``ModelSpec.check_task`` with the valid names.
"""

from __future__ import annotations

from typing import Any

# jina-v3 task name -> PEFT adapter name (PEFT names cannot contain '.') and the subfolder
# of the converted (-hf) layout.
TASK_ADAPTERS: dict[str, str] = {
    "retrieval.query": "retrieval_query",
    "retrieval.passage": "retrieval_passage",
    "separation": "separation",
    "classification": "classification",
    "text-matching": "text_matching",
}
TASKS: tuple[str, ...] = tuple(TASK_ADAPTERS)
JINA_DEFAULT_TASK = "retrieval.passage"
# Published jinaai/jina-embeddings-v3 values, used when a converted config lacks them.
JINA_V3_DEFAULTS: dict[str, Any] = {
    "lora_adaptations": list(TASK_ADAPTERS),
    "task_instructions": {
        "retrieval.query": "Represent the query for retrieving evidence documents: ",
        "retrieval.passage": "Represent the document for retrieval: ",
        "separation": "",
        "classification": "",
        "text-matching": "",
    },
    "matryoshka_dimensions": [32, 64, 128, 256, 512, 768, 1024],
}
# Table task (the stamp's embedjob.task) -> the task its queries are embedded with.
# '' is a table made without an adapter (generic encoders): queries get none either.
QUERY_TASKS: dict[str, str | None] = {
    "retrieval.passage": "retrieval.query",
    "retrieval.query": "retrieval.query",
    "text-matching": "text-matching",
    "separation": "separation",
    "classification": "classification",
    "": None,
    # sentence-transformers prompt names (generic encoders): documents pair with "query"
    "query": "query",
    "passage": "query",
    "document": "query",
}
# sentence-transformers prompt name -> the task name it serves (prefix only, no adapter).
PROMPT_TASKS: dict[str, str] = {"query": "retrieval.query", "passage": "retrieval.passage"}
