# The demo's adaptation without style transfer (the trainer alone: x_st = x_s), for comparison.
{
    "_base_": "demo",
    "name": "demo_nostyle",
    "cut": {"enabled": False},
}
