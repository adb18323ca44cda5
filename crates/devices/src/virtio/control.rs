//! Control requests from the VMM to one device (the balloon's target and statistics, and
//! whatever later devices need), addressed by device id through the VMM's device manager.
//!
//! A request is a JSON value whose shape only the device knows (by convention an object
//! with an `"op"` field); the answer is JSON too. A device that takes requests hands out a
//! [`DeviceControl`] from [`VirtioDevice::control`](super::VirtioDevice::control) when it is
//! built, so a request never waits on the lock of the transport the vCPUs use.

/// Why a device refused a control request.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The device takes no control requests.
    #[error("this device takes no control requests")]
    Unsupported,
    /// The request does not parse as one this device knows.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A well-formed request the device cannot carry out now or with these values.
    #[error("{0}")]
    Refused(String),
}

/// Serves control requests for one device, from any thread.
pub trait DeviceControl: Send + Sync {
    /// Carries out `request` and returns the device's answer.
    fn control(&self, request: &serde_json::Value) -> Result<serde_json::Value, ControlError>;

    /// The handle itself, for a host part that needs its typed API (a VNC server takes the
    /// gpu's [`Display`](super::gpu::Display) and the input devices'
    /// [`InputHandle`](super::input::InputHandle)); None for handles that offer none.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// Decodes `request` as the device's own request type `T`.
pub fn parse_request<T: serde::de::DeserializeOwned>(
    request: &serde_json::Value,
) -> Result<T, ControlError> {
    T::deserialize(request).map_err(|e| ControlError::BadRequest(e.to_string()))
}
