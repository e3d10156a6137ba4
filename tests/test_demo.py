"""The demo, run briefly: a real broker, both models, the cameras; every frame answered."""
import io

from agent.demo import DEFAULT_CAMERAS, run_demo


def test_demo_serves_every_camera_and_answers_every_frame(broker):   # broker: skips if mosquitto is absent
    out = io.StringIO()
    summary = run_demo(duration_s=4.0, load=0.3, interval_s=1.0, out=out)
    assert set(summary) == {c.name for c in DEFAULT_CAMERAS}
    for name, s in summary.items():
        assert s["sent"] > 0, name
        assert s["unanswered"] == 0, (name, s)
        assert s["ok"] + sum(s["errors"].values()) == s["sent"], (name, s)
        assert s["ok"] >= 0.5 * s["sent"], (name, s)          # light load: most frames make their SLO
        assert s["correct"] >= 0.9 * s["ok"], (name, s)       # real predictions on real digits
    text = out.getvalue()
    assert "p99 ms" in text and "mobilenet_digits" in text and "resnet_digits" in text
