"""The mesh's logic, pure (no I/O, no clock): the view of the records, what a record may claim, the fold into this
node's desired device, the plan from the device as it is, and the decider that holds all of it between passes."""
