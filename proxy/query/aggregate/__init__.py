"""Aggregation pipelines: the syntax tree (ast), the front end (parse) and one compiler per
dialect (pg, sqlite); the contract they hold is docs/aggregation.md."""
