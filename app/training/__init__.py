"""Training, the fifth stage: what each trainer sees, when the schedule retrains, and the trainers' configs.

The configs are torch-free, so the web validates run parameters without importing torch; the trainers
themselves live in worker/.
"""
