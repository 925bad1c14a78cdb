"""Demos: the main job (``python -m ofakd_fast.demo.mnist``) and the loss-speed demo (``.loss_speed``)."""
