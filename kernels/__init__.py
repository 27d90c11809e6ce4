"""Pure array kernels of lamina: functions of arrays that return arrays.

Kernels know nothing about chunks, stores or clusters (the engine decides those) and never import
``lamina`` itself. Each docstring states shapes, units and the equation it computes.
"""
