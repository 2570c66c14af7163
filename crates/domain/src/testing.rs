//! given/when/then for aggregates: `given(&events).when(&command).then_expect(events)`.

use std::fmt::Debug;

use crate::aggregate::{Aggregate, DomainError};

/// Starts a scenario from the events already in the stream.
pub fn given<A: Aggregate>(events: &[A::Event]) -> Given<A> {
    let state = events.iter().fold(A::State::default(), A::apply);
    Given { state }
}

#[derive(Debug)]
pub struct Given<A: Aggregate> {
    pub state: A::State,
}

impl<A: Aggregate> Given<A> {
    pub fn when(self, command: &A::Command) -> When<A> {
        let result = A::handle(&self.state, command);
        When { result }
    }

    pub fn when_prepared(self, txid: &str, command: &A::Command) -> When<A> {
        let result = A::prepare(&self.state, txid, command);
        When { result }
    }
}

#[derive(Debug)]
pub struct When<A: Aggregate> {
    pub result: Result<Vec<A::Event>, DomainError>,
}

impl<A: Aggregate> When<A>
where
    A::Event: PartialEq + Debug,
{
    #[track_caller]
    pub fn then_expect(self, events: Vec<A::Event>) {
        assert_eq!(self.result, Ok(events));
    }

    #[track_caller]
    pub fn then_reject(self, contains: &str) {
        match self.result {
            Err(DomainError::Rejected(m)) => assert!(m.contains(contains), "rejected with '{m}', wanted '{contains}'"),
            other => panic!("wanted a rejection containing '{contains}', got {other:?}"),
        }
    }

    #[track_caller]
    pub fn then_invalid(self, contains: &str) {
        match self.result {
            Err(DomainError::Invalid(m)) => assert!(m.contains(contains), "invalid with '{m}', wanted '{contains}'"),
            other => {
                panic!("wanted an invalid-command error containing '{contains}', got {other:?}")
            }
        }
    }
}
