"""Everything that touches the world: agent turns (model + registry) and registry bookkeeping.

Activity names are stable strings; workflows refer to them through these classes.
"""

from activities.agent_turn import AgentTurnActivities
from activities.registry_ops import RegistryActivities

__all__ = ["AgentTurnActivities", "RegistryActivities"]
