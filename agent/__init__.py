"""edge-agent: an on-device DNN inference agent for edge boards.

The front door is :class:`agent.api.Agent` (in process); the MQTT intake
(:mod:`agent.intake.mqtt`) and the Open Inference Protocol intake over HTTP
(:mod:`agent.intake.http`, what Triton's clients speak) feed it. Importing the package stays cheap: submodules load on use.
"""

__version__ = "0.1.0"
