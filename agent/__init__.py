"""edge-agent: an on-device DNN inference agent for edge boards.

The front door is :class:`agent.api.Agent` (in process) and the MQTT intake
(:mod:`agent.intake.mqtt`). Importing the package stays cheap: submodules load on use.
"""

__version__ = "0.1.0"
