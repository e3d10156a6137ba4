"""MQTT transport: the agent's one connection to its broker.

- :mod:`agent.transport.connection`: :class:`~agent.transport.connection.MqttTransport`, the one
  connection per agent (client id, last will, retained status) and its topic router; each topic's
  handler (the inference intake today; offload, control commands, telemetry later) subscribes there.
- :mod:`agent.transport.topics`: the v1 topic names of DESIGN.md, built in one place.
- :mod:`agent.transport.paho_client`: paho client helpers (MQTT v5, TCP_NODELAY, connect and wait
  for CONNACK), also used by applications' clients and the tests.
"""
