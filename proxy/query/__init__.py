"""The query language: parse (front end), AST, and one compiler per dialect (back ends)."""
