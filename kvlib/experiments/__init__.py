"""The paper's experiments: what notebooks/01-06 run, built on the library (``kvlib``) and nothing else.

One module per notebook, each holding the wiring, tables, captions and figures of that notebook, so that a
notebook reads load -> call -> show:

=========================  ==========================================================================
module                     notebook
=========================  ==========================================================================
``vram``                   01: memory of long contexts (Fig. 1)
``kv_embedding_probe``     02: the KV cache as a sentence embedding (Table 1)
``kv_coe``                 03: KV-CoE self-evaluation (Table 2)
``switching``              04: the fast/slow switch (Table 3); its set-up is shared with 05
``budget_sweep``           05: how much KV the difficulty classifier reads (Table 4)
``model_size``             06: Tables 1-3 of several models side by side
``report``                 every notebook: saving tables (timings apart) and figures, caption pieces
``pipeline``               runs the notebooks with papermill (``python -m kvlib.experiments.pipeline``)
``notebook_outputs``       copies executed outputs into the committed notebooks
=========================  ==========================================================================

The library never imports this package (``kvlib.cli``'s ``kvlib reproduce`` hands over to :mod:`.pipeline`).
Nothing is imported here: ``import kvlib.experiments.kv_coe`` loads what one notebook needs.
"""
