"""Flow control in the router: late binding, priority classes, fair shares and SLO-aware admission.

Pure decisions live in their own modules (:mod:`.saturation`, :mod:`.ordering`, :mod:`.fairness`,
:mod:`.admission`); :mod:`.queue` keeps the waiting requests of one model and :mod:`.controller`
is the only part that touches the event loop.
"""
