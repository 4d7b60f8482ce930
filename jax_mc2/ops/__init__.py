"""One module per operator family: primitives, abstract evaluation
(validation), one lowering per implementation, JVP and batching rules."""
