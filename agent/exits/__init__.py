"""Early exits with batching (issue 24): which exit answers each class of users, at what batch size.

:mod:`agent.exits.allocation` holds the problem, its cost and latency model, and the heuristic the
agent runs online (numpy/python only); :mod:`agent.exits.exact` holds the exact solvers the lab and
the tests check it against (a MILP through scipy, which the board need not have, and a brute force
for tiny instances).
"""
from agent.exits.allocation import (AllocationError, Choice, ExitModel, Plan, Problem, UserClass,
                                    evaluate, plan_allocation)

__all__ = ["AllocationError", "Choice", "ExitModel", "Plan", "Problem", "UserClass", "evaluate",
           "plan_allocation"]
