"""Pipelines: the stage table every front goes through, and studies as TOML files run stage by stage.

Above every stage, below the API and the command line (stages -> **pipeline** -> api / cli).
``stages`` lists each stage's request and runner; ``files`` reads ``pipelines/*.toml`` into
requests and runs them; ``ledger`` remembers what an identical training stage wrote.
"""
